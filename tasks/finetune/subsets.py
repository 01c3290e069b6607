"""Fine-tune on each subset and evaluate on held-out data: the paper's table on the user's data.

Three stages share the params section finetune_eval (finetune/dvc.yaml; `dvc repro finetune/dvc.yaml`):
    tasks/finetune/subsets.py  subsets: every method's subsets           (this module: Params + stage)
    tasks/finetune/runs.py     runs:    fine-tune and evaluate each one   (train.py, evaluate.py, trunk.py)
    tasks/finetune/report.py   report:  the table, metrics and plot

    python -m tasks.finetune.subsets --step-scores outputs/score/step_scores.parquet \
        --extract outputs/extract --unconditional outputs/unconditional/losses.parquet \
        --segments outputs/segment/segments.parquet --out-dir outputs/finetune/subsets

Every method (GRACE and each baseline; random once per seed; `full` = the whole scored pool) goes
through the pipeline's own tasks.curate.aggregate.aggregate and tasks.curate.select.select, so baselines and
GRACE are selected by the same code; index.json lists the runs (base model first, full last).
The runs' subsets sit in <method>[-seed<s>]/select/subsets/top<p>pct/ (select's own layout).

`variants` add rows scored another way (issue 12): a method (default grace) with its own gradient
source, scorer (an entry of `scorers`, extracted by tasks/finetune/scorers.py, or the curation's own
`base` extract) and within-cluster selection. A variant on a pooled scorer (scorer.pool = N) keeps
the same number of traces as every other row, the best of its N. Each run records how many problem
clusters its subset covers and, for a warmed scorer, how many of its traces the scorer was warmed on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq

from tasks.core.artifacts import extract_shards
from tasks.core.stage import ParamsError, Stage, StageInputError, params_section, write_json
from tasks.curate import aggregate as aggregate_stage
from tasks.curate import score as score_stage
from tasks.curate import select as select_stage


VARIANT_DEFAULTS = {"method": "grace", "gradient": "proxy", "scorer": "base", "within_clusters": False}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@params_section("finetune_eval")
class Params:
    methods: tuple[str, ...] = ("grace", "random", "length", "loss", "answer_loss")  # score.method values; full always
    random_seeds: tuple[int, ...] = (0, 1, 2)  # method random once per seed: the table shows mean and std
    fractions: tuple[float, ...] = (0.05, 0.2)  # subset sizes, as fractions of the scored pool
    include_base: bool = True  # also evaluate the model before fine-tuning (budget 0)
    mode: str = "lora"  # lora (peft adapters, merged after training) | full (every parameter)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_layers: int | None = 4  # adapt the last N decoder layers only (backward stops there); null = all
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 1.0e-3  # peak; ~1e-5 for mode: full
    weight_decay: float = 0.0
    epochs: int = 1
    batch_tokens: int = 2048  # padded tokens per optimizer step (and per gold-loss batch)
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear decay after warm-up
    max_seq_len: int = 512  # longer examples lose prompt tokens first
    seed: int = 0  # adapter initialisation and batch order
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    accuracy_problems: int | None = 40  # evenly spaced test problems (by id) to generate for; null = all
    max_new_tokens: int = 192  # generation length cap: a longer solution counts as no answer
    eval_batch_size: int = 40  # prompts per generate() call
    trunk_cache: bool = True  # compute the layers below the adapters once for all runs (tasks/finetune/trunk.py)
    cache_dir: str | None = ".grace_cache/finetune"  # per-run results; null = no resume
    # more rows: {name, method: grace, gradient: proxy, scorer: base, within_clusters: false} each
    variants: tuple[dict, ...] = (
        {"name": "grace-clusters", "within_clusters": True}, {"name": "grace-warmed", "scorer": "warmed"},
        {"name": "grace-warmed-clusters", "scorer": "warmed", "within_clusters": True},
        {"name": "grace-projected", "scorer": "projected", "gradient": "projected"},
        {"name": "grace-projected-clusters", "scorer": "projected", "gradient": "projected", "within_clusters": True},
        {"name": "grace-projected-warmed", "scorer": "projected-warmed", "gradient": "projected"},
        {"name": "grace-projected-warmed-clusters", "scorer": "projected-warmed", "gradient": "projected",
         "within_clusters": True})
    # extra extractions variants name: name -> {model: base | warmup, projected: bool, pool: null | N}
    scorers: dict = dataclasses.field(default_factory=lambda: {
        "warmed": {"model": "warmup", "projected": False, "pool": None},
        "projected": {"model": "base", "projected": True, "pool": 500},
        "projected-warmed": {"model": "warmup", "projected": True, "pool": 500}})

    def check(self) -> None:
        def fail(name: str, wanted: str):
            raise ParamsError(f"finetune_eval.{name}: {getattr(self, name)!r}; expected {wanted}")

        for name in ("lora_r", "lora_alpha", "epochs", "batch_tokens", "max_seq_len", "max_new_tokens",
                     "eval_batch_size"):
            if not _positive_int(getattr(self, name)):
                fail(name, "a positive integer")
        for name in ("lora_layers", "accuracy_problems"):
            if getattr(self, name) is not None and not _positive_int(getattr(self, name)):
                fail(name, "a positive integer or null")
        for name, allowed in (("mode", ("lora", "full")), ("schedule", ("cosine", "linear"))):
            if getattr(self, name) not in allowed:
                fail(name, f"one of {list(allowed)}")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            fail("learning_rate", "a positive number (write 2.0e-4, not 2e-4, which YAML 1.1 reads as text)")
        if not isinstance(self.warmup_ratio, (int, float)) or not 0 <= self.warmup_ratio < 1:
            fail("warmup_ratio", "a number in [0, 1)")
        methods = sorted(set(score_stage.METHODS) - {"full"})
        if not self.methods or not set(self.methods) <= set(methods) or len(set(self.methods)) < len(self.methods):
            fail("methods", f"a non-empty list of distinct {methods} (full data always runs)")
        if "random" in self.methods and not self.random_seeds:
            fail("random_seeds", "at least one seed, since methods lists random")
        if not self.fractions or len(set(self.fractions)) < len(self.fractions) or not all(
                isinstance(f, (int, float)) and 0 < f < 1 for f in self.fractions):
            fail("fractions", "distinct numbers in (0, 1) (full data, 1, always runs)")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            fail("device", "auto, cpu, cuda or cuda:N")
        if self.mode == "lora" and (not self.lora_targets or not all(self.lora_targets)):
            fail("lora_targets", "module names (q_proj, v_proj, ...): mode lora adapts those layers")
        self._check_variants(fail)

    def _check_variants(self, fail) -> None:
        scorer_keys, variant_keys = {"model", "projected", "pool"}, set(VARIANT_DEFAULTS) | {"name"}
        if not isinstance(self.scorers, dict) or "base" in self.scorers:
            fail("scorers", "a mapping name -> {model, projected, pool} (base is the curation's extract)")
        for name, spec in self.scorers.items():
            if not isinstance(spec, dict) or set(spec) - scorer_keys or spec.get("model", "base") not in (
                    "base", "warmup") or (spec.get("pool") is not None and not _positive_int(spec["pool"])):
                fail("scorers", f"entry {name}: keys {sorted(scorer_keys)}, model base|warmup, pool null or N")
        for variant in self.variants:  # an unknown key first: `{nme: a}` is a typo, not a missing name
            if not isinstance(variant, dict) or set(variant) - variant_keys:
                unknown = sorted(set(variant) - variant_keys) if isinstance(variant, dict) else variant
                fail("variants", f"entry {variant}: unknown key(s) {unknown}; keys are {sorted(variant_keys)}")
        names = [v.get("name") for v in self.variants]
        reserved = set(self.methods) | {"base", "full"}
        if len(set(names)) < len(names) or not all(isinstance(n, str) and n and n not in reserved for n in names):
            fail("variants", f"entries with distinct names, none of {sorted(reserved)}")
        for variant in self.variants:
            spec = {**VARIANT_DEFAULTS, **variant}
            if set(variant) - variant_keys or spec["method"] not in set(score_stage.METHODS) - {"full"} \
                    or spec["gradient"] not in score_stage.GRADIENTS or not isinstance(spec["within_clusters"], bool) \
                    or (spec["scorer"] != "base" and spec["scorer"] not in self.scorers):
                fail("variants", f"entry {variant}: keys {sorted(variant_keys)}, a method, a gradient of "
                     f"{list(score_stage.GRADIENTS)}, scorer base or one of {sorted(self.scorers)}")
            if spec["gradient"] == "projected" and spec["scorer"] != "base" \
                    and not self.scorers[spec["scorer"]].get("projected", False):
                fail("variants", f"entry {variant}: gradient projected needs projected Grams, which scorer "
                     f"{spec['scorer']} does not extract; set finetune_eval.scorers.{spec['scorer']}.projected: true")


def check_gram_sources(jobs: list[tuple[str, dict]], extract: Path, scorers: Path) -> None:
    """Before anything runs: every variant's gradient has its Grams in its scorer's extract output (the
    curation's own, scorer base, has projected Grams only with extract.projected: true, head Grams only with
    extract.head_variant: true); one line naming the variant and the setting, not a traceback midway."""
    for label, job in jobs:
        gradient, scorer = job.get("gradient", "proxy"), job.get("scorer", "base")
        if gradient == "proxy" or "name" not in job:
            continue
        source = Path(extract) if scorer == "base" else Path(scorers) / scorer / "extract"
        column = score_stage.gram_column(gradient)
        parts = extract_shards(source)
        missing = sum(pq.read_table(part, columns=["id"]).num_rows if column not in pq.read_schema(part).names
                      else pq.read_table(part, columns=[column])[column].null_count for part in parts)
        if missing or not parts:
            setting = score_stage.EXTRACT_SWITCH[gradient] if scorer == "base" else \
                f"finetune_eval.scorers.{scorer}.projected: true" if gradient == "projected" else \
                f"scorer base with {score_stage.EXTRACT_SWITCH[gradient]}"
            raise StageInputError(f"finetune_eval.variants: {label} uses gradient {gradient} on scorer {scorer}, "
                                  f"whose extract ({source}) has no {column} for {missing} traces; set {setting}")


def _subset_runs(label: str, row: str, seed, fractions, subset_names, manifest: dict, extra: dict) -> list[dict]:
    """One run per fraction of the pool; `row` is the table row (the method, or the variant's name)."""
    return [{"name": label if row == "full" else f"{label}-{select_stage.fraction_subset_name(fraction)}",
             "method": row, "seed": seed, "fraction": fraction, "ids": f"{label}/select/subsets/{subset}/ids.txt",
             "n_clusters_covered": manifest["subsets"][subset]["n_clusters_covered"], **extra}
            for fraction, subset in zip(fractions, subset_names)]


def build_subsets(step_scores: Path, extract: Path, unconditional: Path, segments: Path, clusters: Path,
                  scorers: Path, warmup: Path, out_dir: Path, params: Params, score: score_stage.Params,
                  aggregate: aggregate_stage.Params, select: select_stage.Params) -> dict:
    """Every method's and variant's subsets through aggregate + select; index.json lists the runs, base first."""
    base = {"name": "base", "method": "base", "seed": None, "fraction": 0.0, "ids": None}  # no fine-tuning
    runs = [base] if params.include_base else []
    n_pool = pq.read_metadata(Path(segments)).num_rows
    methods = [(m, seed) for m in params.methods for seed in (params.random_seeds if m == "random" else [None])]
    jobs = [(method if seed is None else f"{method}-seed{seed}", {"method": method, "seed": seed})
            for method, seed in [*methods, ("full", None)]]
    jobs += [(variant["name"], {**VARIANT_DEFAULTS, **variant, "seed": None}) for variant in params.variants]
    check_gram_sources(jobs, extract, scorers)
    warmed_on = set()
    if any(params.scorers.get(v.get("scorer"), {}).get("model") == "warmup" for v in params.variants):
        warmed_on = set((Path(warmup) / "ids.txt").read_text(encoding="utf-8").split())
    for label, job in jobs:
        work, method, seed = Path(out_dir) / label, job["method"], job["seed"]
        scorer = job.get("scorer", "base")
        source = Path(extract) if scorer == "base" else Path(scorers) / scorer / "extract"
        job_score = dataclasses.replace(score, method=method, gradient=job.get("gradient", score.gradient))
        job_steps = step_scores
        if source != Path(extract) or job_score.gradient != score.gradient:
            score_stage.score(source, work / "score", job_score)
            job_steps = work / "score" / "step_scores.parquet"
        seeded = aggregate if seed is None else dataclasses.replace(aggregate, random_seed=seed)
        aggregate_stage.aggregate(job_steps, source, work / "aggregate", seeded, job_score, unconditional=unconditional)
        n_scored = pq.read_metadata(work / "aggregate" / "sample_scores.parquet").num_rows
        fractions = (1.0,) if method == "full" else params.fractions
        # the same number of traces as every other row: on a pooled scorer, the best of its pool
        own = fractions if n_scored == n_pool or method == "full" else tuple(select_stage.fraction_size(f, n_pool) / n_scored
                                                         for f in fractions)
        if max(own) > 1:
            raise ParamsError(f"finetune_eval.scorers.{scorer}.pool: {n_scored} traces cannot give "
                              f"{select_stage.fraction_size(max(fractions), n_pool)}; raise pool")
        manifest = select_stage.select(
            work / "aggregate" / "sample_scores.parquet", segments, work / "select",
            dataclasses.replace(select, fractions=own, token_budget=None,
                                within_clusters=job.get("within_clusters", False)), clusters=clusters)
        is_variant = "name" in job
        extra = {"variant": {key: job[key] for key in VARIANT_DEFAULTS}, "n_scored": n_scored} if is_variant else {}
        warmed = scorer != "base" and params.scorers[scorer].get("model") == "warmup"
        names = [select_stage.fraction_subset_name(f) for f in own]
        for run in _subset_runs(label, label if is_variant else method, seed, fractions, names, manifest, extra):
            if warmed:
                ids = set((Path(out_dir) / run["ids"]).read_text(encoding="utf-8").split())
                run["warmup_overlap"] = len(ids & warmed_on)  # traces of the subset the scorer was tuned on
            runs.append(run)
    write_json(Path(out_dir) / "index.json", {"runs": runs})
    return {"runs": len(runs)}


STAGE = Stage(build_subsets, Params, paths=[
    ("step_scores", "step_scores.parquet (score stage)"),
    ("extract", "extract output directory"),
    ("unconditional", "losses.parquet (unconditional stage; read for method ifd)"),
    ("segments", "segments.parquet (segment stage)"),
    ("clusters", "clusters.parquet (cluster stage): coverage and within_clusters"),
    ("scorers", "the scorers stage's output directory (tasks.finetune.scorers)"),
    ("warmup", "the warmup stage's output directory (its ids.txt)"),
    ("out_dir", "directory for the subsets and index.json"),
], extra_sections=[
    ("score", score_stage.Params),
    ("aggregate", aggregate_stage.Params),
    ("select", select_stage.Params),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
