"""Fine-tune on each subset and evaluate on held-out data: the paper's table on the user's data.

Three stages share the params section finetune_eval (finetune/dvc.yaml; `dvc repro finetune/dvc.yaml`):
    tasks/finetune_eval.py    subsets: every method's subsets           (this module: Params + stage)
    tasks/finetune_runs.py    runs:    fine-tune and evaluate each one   (finetune.py, evaluate.py, trunk.py)
    tasks/finetune_report.py  report:  the table, metrics and plot

    python -m tasks.finetune_eval --step-scores outputs/score/step_scores.parquet \
        --extract outputs/extract --unconditional outputs/unconditional/losses.parquet \
        --segments outputs/segment/segments.parquet --out-dir outputs/finetune/subsets

Every method (GRACE and each baseline; random once per seed; `full` = the whole scored pool) goes
through the pipeline's own tasks.aggregate.aggregate and tasks.select.select, so baselines and
GRACE are selected by the same code; index.json lists the runs (base model first, full last).
The runs' subsets sit in <method>[-seed<s>]/select/subsets/top<p>pct/ (select's own layout).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tasks import aggregate as aggregate_stage
from tasks import score as score_stage
from tasks import select as select_stage
from tasks.stage import ParamsError, params_section, run_stage, write_json


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@params_section("finetune_eval")
class Params:
    methods: tuple[str, ...] = ("grace", "random", "length", "loss")  # score.method values; full always runs
    random_seeds: tuple[int, ...] = (0, 1)  # method random once per seed: the table shows mean and std
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
    trunk_cache: bool = True  # compute the layers below the adapters once for all runs (tasks/trunk.py)
    cache_dir: str | None = ".grace_cache/finetune"  # per-run results; null = no resume

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


def build_subsets(step_scores: Path, extract: Path, unconditional: Path, segments: Path, out_dir: Path,
                  params: Params, score: score_stage.Params, aggregate: aggregate_stage.Params,
                  select: select_stage.Params) -> dict:
    """Every method's subsets through aggregate + select; index.json lists the runs, base first."""
    base = {"name": "base", "method": "base", "seed": None, "fraction": 0.0, "ids": None}  # no fine-tuning
    runs = [base] if params.include_base else []
    methods = [(m, seed) for m in params.methods for seed in (params.random_seeds if m == "random" else [None])]
    for method, seed in [*methods, ("full", None)]:
        label = method if seed is None else f"{method}-seed{seed}"
        fractions = (1.0,) if method == "full" else params.fractions
        work = Path(out_dir) / label
        seeded = aggregate if seed is None else dataclasses.replace(aggregate, random_seed=seed)
        aggregate_stage.aggregate(step_scores, extract, work / "aggregate", seeded,
                                  dataclasses.replace(score, method=method), unconditional=unconditional)
        select_stage.select(work / "aggregate" / "sample_scores.parquet", segments, work / "select",
                            dataclasses.replace(select, fractions=fractions, token_budget=None))
        for fraction in fractions:
            subset = select_stage.fraction_subset_name(fraction)
            runs.append({"name": label if method == "full" else f"{label}-{subset}", "method": method,
                         "seed": seed, "fraction": fraction, "ids": f"{label}/select/subsets/{subset}/ids.txt"})
    write_json(Path(out_dir) / "index.json", {"runs": runs})
    return {"runs": len(runs)}


def main(argv: list[str] | None = None) -> dict:
    return run_stage("finetune_eval", Params,
                     [("step_scores", "step_scores.parquet (score stage)"), ("extract", "extract output directory"),
                      ("unconditional", "losses.parquet (unconditional stage; read for method ifd)"),
                      ("segments", "segments.parquet (segment stage)"),
                      ("out_dir", "directory for the subsets and index.json")],
                     build_subsets, argv, extra_sections=[("score", score_stage.Params),
                                                          ("aggregate", aggregate_stage.Params),
                                                          ("select", select_stage.Params)])


if __name__ == "__main__":
    main()
