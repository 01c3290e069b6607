"""Stage `warmup`: a scorer that already knows the task's format (issue 12, explanation c).

    python -m tasks.finetune.warmup --segments outputs/segment/segments.parquet --model outputs/model \
        --out-dir outputs/finetune/warmup

Before it has seen the corpus, a base model's gradient on every step of every trace mostly says
"learn this format" (the answer line, the step layout), so the alignment between steps and answer
carries little about the trace itself. LESS (Xia et al., 2024) found a short warm-up on a small
random subset essential before its gradient features are useful. This stage does the same with the
project's own fine-tune code (tasks/finetune/train.py): LoRA on a seeded random `fraction` of the pool,
`epochs` passes, adapters merged, and writes a plain model directory that extract loads like any
other (model_info.json with the identity of the new weights, so the extraction cache keys follow).

Outputs: model/ (config, safetensors, tokenizer, model_info.json), ids.txt (the warm-up subset,
sorted: the fine-tune table reports how many of each subset's traces the scorer saw) and stats.json.
To curate with the warmed scorer, point the model stage at it: `model.source: outputs/finetune/warmup/model`.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from tasks.core.progress import show_progress
from tasks.core.stage import ParamsError, Stage, StageLedger, atomic_write_text, module_logger, params_section

log = module_logger(__name__)


@params_section("warmup")
class Params:
    fraction: float = 0.05  # share of the pool the scorer is warmed on (seeded random)
    seed: int = 0  # which traces, and the adapters' initialisation and batch order
    epochs: int = 1  # passes over the warm-up subset
    mode: str = "lora"  # lora (adapters merged afterwards) | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_layers: int | None = None  # adapters on every layer (null), as LESS warms up; N = the last N only
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 1.0e-3  # peak; ~1e-5 for mode: full
    weight_decay: float = 0.0
    batch_tokens: int = 2048  # padded tokens per optimizer step
    warmup_ratio: float = 0.1  # share of the steps with a linearly rising learning rate
    schedule: str = "cosine"  # cosine | linear decay after the rise
    max_seq_len: int = 512  # longer examples lose prompt tokens first
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N

    def check(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction < 1:
            raise ParamsError(f"warmup.fraction: {self.fraction!r}; expected a number in (0, 1)")
        for name in ("epochs", "lora_r", "lora_alpha", "batch_tokens", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamsError(f"warmup.{name}: {value!r}; expected a positive integer")
        if self.lora_layers is not None and (isinstance(self.lora_layers, bool) or not isinstance(self.lora_layers, int)
                                             or self.lora_layers < 1):
            raise ParamsError(f"warmup.lora_layers: {self.lora_layers!r}; expected a positive integer or null")
        for name, allowed in (("mode", ("lora", "full")), ("schedule", ("cosine", "linear"))):
            if getattr(self, name) not in allowed:
                raise ParamsError(f"warmup.{name}: {getattr(self, name)!r}; expected one of {list(allowed)}")
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, (int, float)) \
                or not self.learning_rate > 0:
            raise ParamsError(f"warmup.learning_rate: {self.learning_rate!r}; expected a positive number "
                              "(write 1.0e-3, not 1e-3, which YAML 1.1 reads as text)")
        if not isinstance(self.warmup_ratio, (int, float)) or not 0 <= self.warmup_ratio < 1:
            raise ParamsError(f"warmup.warmup_ratio: {self.warmup_ratio!r}; expected a number in [0, 1)")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ParamsError(f"warmup.device: {self.device!r}; expected auto, cpu, cuda or cuda:N")
        if self.mode == "lora" and (not self.lora_targets or not all(self.lora_targets)):
            raise ParamsError(f"warmup.lora_targets: {list(self.lora_targets)}; expected module names "
                              "(q_proj, v_proj, ...): mode lora adapts those layers")


def warmup_ids(ids: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded random `fraction` of the pool (at least one trace), sorted; independent of input order."""
    from tasks.curate.select import fraction_size

    pool = sorted(ids)
    return sorted(random.Random(f"warmup-{seed}").sample(pool, fraction_size(fraction, len(pool))))


def warmup(segments: Path, model: Path, out_dir: Path, params: Params) -> dict:
    """LoRA-tune the scoring model on a random slice of the pool; write the merged model for extract."""
    from tasks.finetune import train
    from tasks.curate.model import TOKENIZER_FILES, model_identity

    started = time.perf_counter()
    rows = pq.read_table(segments, columns=["id", "prompt_messages", "response"]).to_pylist()
    ledger = StageLedger("warmup")
    ledger.count_read(len(rows))
    ledger.keep(len(rows))
    if not rows:
        raise ValueError(f"warmup: {segments} holds no traces to warm the scorer on")
    chosen = set(warmup_ids([row["id"] for row in rows], params.fraction, params.seed))
    tokenizer = train.load_tokenizer(Path(model))  # a VLM's processor: its images go with each example
    examples = [train.encode(tokenizer, json.loads(row["prompt_messages"]), row["response"], params.max_seq_len)
                for row in sorted(rows, key=lambda row: row["id"]) if row["id"] in chosen]
    device = train.resolve_device(params.device)
    with show_progress("warmup", None, "step", log) as progress:  # train sets the total once it has the batches
        tuned, train_log = train.train(train.load_model(Path(model), device), examples, params,
                                       train.padding_id(tokenizer), progress, processor=train.processor_of(tokenizer))

    out_dir = Path(out_dir)
    staging = out_dir / ".model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    tuned.to("cpu").save_pretrained(staging, safe_serialization=True)
    for name in TOKENIZER_FILES:  # the base model's tokenizer and template (a VLM's processor too), byte for byte
        if (Path(model) / name).exists():
            shutil.copy2(Path(model) / name, staging / name)
    base_info = json.loads((Path(model) / "model_info.json").read_text(encoding="utf-8"))
    info = {**base_info, "identity": model_identity(staging), "warmed_from": base_info["identity"],
            "source": f"warmup of {base_info.get('source')} on {len(examples)} traces"}
    (staging / "model_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.rmtree(out_dir / "model", ignore_errors=True)
    staging.rename(out_dir / "model")  # the model appears whole or not at all
    atomic_write_text(out_dir / "ids.txt", "".join(i + "\n" for i in sorted(chosen)))
    ledger.extra.update(n_warmup=len(examples), warmup_tokens=sum(len(e.input_ids) for e in examples),
                        steps=train_log["steps"], loss_first=train_log["loss_first"], loss_last=train_log["loss_last"],
                        identity=info["identity"], warmed_from=info["warmed_from"], device=device,
                        seconds=round(time.perf_counter() - started, 1))
    return ledger.write_stats(out_dir / "stats.json")


STAGE = Stage(warmup, Params, paths=[
    ("segments", "segments.parquet (segment stage): the pool"),
    ("model", "the base scoring model directory (model stage)"),
    ("out_dir", "where model/, ids.txt and stats.json go"),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
