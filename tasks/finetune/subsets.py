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
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.artifacts import extract_shards
from tasks.core.stage import ParamsError, Stage, StageInputError, params_section, write_json, write_parquet
from tasks.curate import aggregate as aggregate_stage
from tasks.curate import score as score_stage
from tasks.curate import select as select_stage


PRECISIONS = ("auto", "fp32", "bf16")  # tasks.finetune.train.resolve_precision
CALIBRATION = ("oracle", "anti-oracle")  # rows drawn from the labels: random clean, random corrupted traces
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
    steps: int | None = None  # optimizer steps per run, the same for every subset (epochs cycle); null = epochs decide
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with AMX tiles, else fp32) | fp32 | bf16
    budget: str = "samples"  # samples | tokens: a budget's subsets hold the same number of traces, or response tokens
    repeats: int = 1  # training seeds (seed, seed + 1, ...) per deterministic row; seeded rows train with seed + their own
    token_matched_random: bool = True  # budget samples: also a random-tokens row per seed (fraction x the pool's tokens)
    # calibration rows, where data.labels has labels: oracle (random clean traces) and anti-oracle (random corrupted)
    # per seed and fraction, and a dose-response (these clean shares, the rest corrupted) at dose_fraction
    calibration: bool = True
    dose_shares: tuple[float, ...] = (0.7, 0.4)
    dose_fraction: float | None = 0.2
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
        for name, allowed in (("precision", PRECISIONS), ("budget", ("samples", "tokens"))):
            if getattr(self, name) not in allowed:
                fail(name, f"one of {list(allowed)}")
        if self.steps is not None and not _positive_int(self.steps):
            fail("steps", "a positive integer or null")
        if not _positive_int(self.repeats):
            fail("repeats", "a positive integer")
        for name in ("calibration", "token_matched_random"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1 for s in self.dose_shares):
            fail("dose_shares", "clean shares in [0, 1) (1.0 is the oracle row)")
        if self.dose_fraction is not None and (isinstance(self.dose_fraction, bool) or not isinstance(
                self.dose_fraction, (int, float)) or not 0 < self.dose_fraction < 1):
            fail("dose_fraction", "null or a number in (0, 1) (the oracle rows run at it too)")
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


def read_clean_labels(labels: Path | None) -> dict[str, bool]:
    """id -> clean, from a labels.jsonl ({"id", "corrupted", ...} per line); {} for no file or an empty one."""
    if labels is None:
        return {}
    with open(labels, encoding="utf-8") as handle:
        return {row["id"]: not row["corrupted"] for row in map(json.loads, filter(str.strip, handle))}


def calibrated_scores(ids: list[str], clean_of: dict[str, bool], kind: str, seed: int, share: float | None = None,
                      n_dose: int = 0) -> list[float]:
    """Scores that rank a calibration row's traces first, in a seeded random order, the rest after them.

    oracle: every clean trace first; anti-oracle: every corrupted one; dose: round(share * n_dose) clean and the rest
    of n_dose corrupted. Each trace gets u ~ U(0, 1), the chosen ones 1 + u, so select's own top-n (or token
    budget prefix) is a random draw among the chosen."""
    unlabelled = [i for i in ids if i not in clean_of]
    if unlabelled:
        raise ValueError(f"calibration rows: {len(unlabelled)} scored traces have no label (e.g. {unlabelled[:3]}); "
                         "data.labels must label the whole pool")
    rng = random.Random(f"{kind}-{share}-{seed}")
    if kind == "dose":
        clean = [i for i in sorted(ids) if clean_of[i]]
        corrupted = [i for i in sorted(ids) if not clean_of[i]]
        rng.shuffle(clean)
        rng.shuffle(corrupted)
        n_clean = round(share * n_dose)
        if n_clean > len(clean) or n_dose - n_clean > len(corrupted):
            raise ParamsError(f"finetune_eval.dose_shares: {share} of {n_dose} traces needs {n_clean} clean and "
                              f"{n_dose - n_clean} corrupted; the pool has {len(clean)} and {len(corrupted)}")
        chosen = set(clean[:n_clean] + corrupted[: n_dose - n_clean])
    else:
        chosen = {i for i in ids if clean_of[i] == (kind == "oracle")}
    return [rng.random() + (1.0 if i in chosen else 0.0) for i in ids]


def _rescore(sample_scores: Path, scores: list[float]) -> int:
    """Replace the score column of a sample_scores.parquet; the number of traces scored above 1 (chosen)."""
    table = pq.read_table(sample_scores)
    table = table.set_column(table.schema.get_field_index("score"), "score", pa.array(scores, pa.float64()))
    write_parquet(sample_scores, table)
    return sum(score >= 1.0 for score in scores)


def _train_seeds(params: Params, seed: int | None, trains: bool) -> list[tuple[int | None, int]]:
    """(the run's seed label, its training seed): a seeded row trains once with seed + its own; a deterministic row
    `repeats` times (labels 0.. when more than one)."""
    if seed is not None:
        return [(seed, params.seed + seed)]
    if not trains or params.repeats == 1:
        return [(None, params.seed)]
    return [(k, params.seed + k) for k in range(params.repeats)]


def build_subsets(step_scores: Path, extract: Path, unconditional: Path, segments: Path, clusters: Path,
                  scorers: Path, warmup: Path, out_dir: Path, params: Params, score: score_stage.Params,
                  aggregate: aggregate_stage.Params, select: select_stage.Params, labels: Path | None = None) -> dict:
    """Every method's, variant's and calibration row's subsets through aggregate + select; index.json lists the
    runs, base first.

    Calibration rows (labels given, finetune_eval.calibration): oracle and anti-oracle per random seed and fraction,
    dose-response rows at dose_fraction; they rank with labels, then go through the same select as every row.
    With budget: tokens every subset of a fraction holds fraction x the pool's response tokens (select's token
    budget); with samples, a random-tokens row per seed does, so a selector of long or short traces has a
    token-matched random anchor."""
    base = {"name": "base", "method": "base", "seed": None, "train_seed": None, "fraction": 0.0, "ids": None}
    runs = [base] if params.include_base else []
    n_pool = pq.read_metadata(Path(segments)).num_rows
    methods = [(m, seed) for m in params.methods for seed in (params.random_seeds if m == "random" else [None])]
    jobs = [(method if seed is None else f"{method}-seed{seed}", {"method": method, "seed": seed})
            for method, seed in [*methods, ("full", None)]]
    if "random" in params.methods and params.budget == "samples" and params.token_matched_random:
        jobs += [(f"random-tokens-seed{seed}", {"method": "random", "seed": seed, "row": "random-tokens",
                                                 "budget": "tokens"}) for seed in params.random_seeds]
    jobs += [(variant["name"], {**VARIANT_DEFAULTS, **variant, "seed": None}) for variant in params.variants]
    clean_of = read_clean_labels(labels) if params.calibration else {}
    if clean_of:
        oracle_fractions = tuple(sorted({*params.fractions, *([params.dose_fraction] if params.dose_fraction else [])}))
        jobs += [(f"{kind}-seed{seed}", {"method": "random", "seed": seed, "row": kind, "calibration": kind,
                                         "fractions": oracle_fractions if kind == "oracle" else params.fractions})
                 for kind in CALIBRATION for seed in params.random_seeds]
        if params.dose_fraction is not None:
            jobs += [(f"dose{round(share * 100)}-seed{seed}",
                      {"method": "random", "seed": seed, "row": f"dose{round(share * 100)}", "calibration": "dose",
                       "share": share, "fractions": (params.dose_fraction,)})
                     for share in params.dose_shares for seed in params.random_seeds]
    check_gram_sources(jobs, extract, scorers)
    warmed_on = set()
    if any(params.scorers.get(v.get("scorer"), {}).get("model") == "warmup" for v in params.variants):
        warmed_on = set((Path(warmup) / "ids.txt").read_text(encoding="utf-8").split())
    pool_tokens = None  # the whole pool's response tokens: a token budget is a fraction of them
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
        sample_scores = work / "aggregate" / "sample_scores.parquet"
        scored = pq.read_table(sample_scores, columns=["id", "n_tokens"]).to_pydict()
        n_scored = len(scored["id"])
        if pool_tokens is None and n_scored == n_pool:
            pool_tokens = sum(scored["n_tokens"])
        fractions = (1.0,) if method == "full" else job.get("fractions", params.fractions)
        if "calibration" in job:
            chosen = _rescore(sample_scores, calibrated_scores(
                scored["id"], clean_of, job["calibration"], seed, job.get("share"),
                select_stage.fraction_size(fractions[0], n_pool)))
            if chosen < select_stage.fraction_size(max(fractions), n_pool):
                raise ParamsError(f"finetune_eval.fractions: {max(fractions)} of the pool is more traces than the "
                                  f"{chosen} a {job['row']} row can draw from")
        # the same number of traces as every other row: on a pooled scorer, the best of its pool
        own = fractions if n_scored == n_pool or method == "full" else tuple(
            select_stage.fraction_size(f, n_pool) / n_scored for f in fractions)
        if max(own) > 1:
            raise ParamsError(f"finetune_eval.scorers.{scorer}.pool: {n_scored} traces cannot give "
                              f"{select_stage.fraction_size(max(fractions), n_pool)}; raise pool")
        within = job.get("within_clusters", False)
        # a calibration row is its labels' draw: strata or a per-question cap would fill it with other traces
        job_select = select if "calibration" not in job else dataclasses.replace(
            select, stratify_by=None, max_per_question=None)
        subsets = []  # (fraction, ids.txt relative to out_dir, the subset's manifest entry)
        if method == "full" or job.get("budget", params.budget) == "samples":
            manifest = select_stage.select(sample_scores, segments, work / "select", dataclasses.replace(
                job_select, fractions=own, token_budget=None, within_clusters=within), clusters=clusters)
            for fraction, fraction_own in zip(fractions, own):
                name = select_stage.fraction_subset_name(fraction_own)
                subsets.append((fraction, f"{label}/select/subsets/{name}/ids.txt", manifest["subsets"][name]))
        else:
            for fraction in fractions:  # one select per budget: select takes one token budget at a time
                tokens, name = round(fraction * pool_tokens), select_stage.fraction_subset_name(fraction)
                manifest = select_stage.select(sample_scores, segments, work / f"select-{name}", dataclasses.replace(
                    job_select, fractions=(), token_budget=tokens, within_clusters=within), clusters=clusters)
                subsets.append((fraction, f"{label}/select-{name}/subsets/budget{tokens}tok/ids.txt",
                                manifest["subsets"][f"budget{tokens}tok"]))
        is_variant = "name" in job
        row = job.get("row", label if is_variant else method)
        extra = {"variant": {key: job[key] for key in VARIANT_DEFAULTS}, "n_scored": n_scored} if is_variant else {}
        if "calibration" in job:
            extra["calibration"] = {"kind": job["calibration"], "clean_share": job.get("share")}
        warmed = scorer != "base" and params.scorers[scorer].get("model") == "warmup"
        for fraction, ids_path, entry in subsets:
            ids = (Path(out_dir) / ids_path).read_text(encoding="utf-8").split()
            if not ids:  # a token budget smaller than the first-ranked trace: nothing to train on
                raise ParamsError(f"finetune_eval.fractions: {label} at {fraction} holds no trace (budget "
                                  f"{params.budget}); raise the fraction")
            for seed_label, train_seed in _train_seeds(params, seed, trains=True):
                stem = label if seed is not None or seed_label is None else f"{label}-seed{seed_label}"
                run = {"name": stem if method == "full" else f"{stem}-{select_stage.fraction_subset_name(fraction)}",
                       "method": row, "seed": seed_label, "train_seed": train_seed, "fraction": fraction,
                       "ids": ids_path, "n_clusters_covered": entry["n_clusters_covered"], **extra}
                if clean_of:
                    run["clean_share"] = sum(clean_of.get(i, False) for i in ids) / len(ids)
                if warmed:
                    run["warmup_overlap"] = len(set(ids) & warmed_on)  # traces of the subset the scorer was tuned on
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
], optional_paths=[
    ("labels", "labels.jsonl (data.labels; never read by curation): calibration rows; an empty file = none"),
], extra_sections=[
    ("score", score_stage.Params),
    ("aggregate", aggregate_stage.Params),
    ("select", select_stage.Params),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
