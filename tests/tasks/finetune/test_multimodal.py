"""The fine-tune table on multimodal traces: a tiny random LLaVA (tests/tasks/tiny_vlm.py) trained, scored and
evaluated on charts of data/mm_charts read by the real ingest and segment; runs end to end; a warmed VLM that
extract loads."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tasks.curate import aggregate, cluster, extract, ingest, score, segment, select
from tasks.curate.images import image_paths
from tasks.curate.model import TOKENIZER_FILES
from tasks.curate.vlm import VLMProxyModel
from tasks.finetune import evaluate, train
from tasks.finetune.report import report
from tasks.finetune.runs import run_all
from tasks.finetune.subsets import Params, build_subsets
from tasks.finetune.warmup import Params as WarmupParams
from tasks.finetune.warmup import warmup
from tests.tasks.tiny_vlm import build_tiny_vlm_dir

CHARTS = Path(__file__).resolve().parents[3] / "data" / "mm_charts"
N_POOL, N_TEST = 8, 3  # the first 8 charts are the pool, the next 3 the held-out problems


def ingested(root: Path, rows: list[dict]) -> Path:
    """mm_charts rows -> root/segment/segments.parquet (and root/ingest/traces.parquet) through the real stages."""
    root.mkdir(parents=True)
    (root / "pool.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    ingest.ingest(root / "pool.jsonl", root / "ingest", ingest.Params(preset="sharegpt", image_root=str(CHARTS)))
    segment.segment(root / "ingest" / "traces.parquet", root / "segment", segment.Params())
    return root / "segment" / "segments.parquet"


@pytest.fixture(scope="module")
def charts(tmp_path_factory) -> dict[str, Path]:
    """A tiny VLM, a segmented pool of N_POOL charts and an ingested test set of N_TEST others."""
    root = tmp_path_factory.mktemp("mm_finetune")
    rows = [json.loads(line) for line in (CHARTS / "pool.jsonl").read_text(encoding="utf-8").splitlines()]
    segments = ingested(root / "pool", rows[:N_POOL])
    ingested(root / "test", rows[N_POOL: N_POOL + N_TEST])
    return {"model": build_tiny_vlm_dir(root / "vlm"), "segments": segments,
            "test": root / "test" / "ingest" / "traces.parquet"}


@pytest.fixture(scope="module")
def processor(charts):
    return train.load_tokenizer(charts["model"])


def pool_rows(charts) -> list[dict]:
    return sorted(pq.read_table(charts["segments"]).to_pylist(), key=lambda row: row["id"])


def chart_examples(charts, processor, max_seq_len: int = 512) -> list[train.ImageExample]:
    return [train.encode(processor, json.loads(row["prompt_messages"]), row["response"], max_seq_len)
            for row in pool_rows(charts)]


def test_examples_carry_their_images_and_only_the_completion_has_labels(charts, processor):
    row = pool_rows(charts)[0]
    example = train.encode(processor, json.loads(row["prompt_messages"]), row["response"], 512)
    assert isinstance(example, train.ImageExample) and len(example.images) == 1
    # the trace names its image as ingest recorded it (relative to the checkout, images.recorded_path)
    assert Path(example.images[0]).resolve() == (CHARTS / "images" / f"{row['id']}.png").resolve()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = torch.tensor(example.input_ids)
    assert int((ids == image_id).sum()) == 4  # the placeholder expanded: (28 / 14)^2 patches of the tiny CLIP
    assert int((ids[: example.n_prompt] == image_id).sum()) == 4  # all in the prompt
    batch = train.collate([example], train.padding_id(processor), "cpu", processor=processor)
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    labelled = (batch["labels"][0] != train.IGNORE).nonzero().flatten()
    assert labelled.tolist() == list(range(example.n_prompt, len(example.input_ids)))  # the completion's span
    # exactly the response and its end of turn, as the text path trains (tests/tasks/finetune/test_train.py)
    assert processor.tokenizer.decode(batch["labels"][0, labelled]) == row["response"] + "<|im_end|>\n"
    prompt = processor.tokenizer.decode(ids[: example.n_prompt])
    assert prompt.startswith("<|im_start|>user\n<image><image><image><image>") and prompt.endswith(
        "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="max_seq_len"):  # image tokens are never cut
        train.encode(processor, json.loads(row["prompt_messages"]), row["response"], 10)


def test_gold_loss_depends_on_the_pixels(charts, processor):
    model = train.load_model(charts["model"], "cpu")
    own, other = chart_examples(charts, processor)[:2]
    swapped = train.ImageExample(own.input_ids, own.n_prompt, own.truncated, own.prompt, other.images)
    pad = train.padding_id(processor)
    sums, counts = evaluate.gold_nll(model, [own, swapped], pad, 4096, processor=processor)
    assert counts[0] == counts[1] == len(own.input_ids) - own.n_prompt
    assert abs(sums[0] - sums[1]) > 1e-4  # the same tokens, another chart: the images are truly fed
    alone, _ = evaluate.gold_nll(model, [own], pad, 4096, processor=processor)
    assert alone[0] == pytest.approx(sums[0], rel=1e-5)  # a batch gives each row its own image
    with torch.no_grad():  # the model's own forward, logits over every position, gives the same loss
        batch = train.collate([own], pad, "cpu", processor=processor)
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits[0, :-1]
        reference = torch.nn.functional.cross_entropy(logits, batch["labels"][0, 1:], ignore_index=train.IGNORE,
                                                      reduction="sum")
    assert float(reference) == pytest.approx(sums[0], rel=1e-5)


def test_training_lowers_the_loss_with_lora_on_the_language_model_only(charts, processor):
    params = Params(lora_layers=1, epochs=4, learning_rate=1.0e-2, batch_tokens=512, device="cpu")
    model = train.load_model(charts["model"], "cpu")
    targets = train.language_model_targets(model, params)
    assert targets and all(name.startswith("model.language_model.layers.1.") for name in targets)
    examples = chart_examples(charts, processor)
    tuned, log = train.train(model, examples, params, train.padding_id(processor), processor=processor)
    assert log["steps"] >= 4 and all(torch.isfinite(torch.tensor(log["losses"])))
    assert log["loss_last"] < log["loss_first"]
    base = train.load_model(charts["model"], "cpu")
    changed = {name for name, weight in tuned.state_dict().items()
               if not torch.equal(weight, base.state_dict()[name])}
    assert changed and all(name.startswith("model.language_model.layers.1.") for name in changed)


def test_runs_make_a_table_of_base_a_method_and_full_on_multimodal_traces(charts, tmp_path, caplog):
    root = tmp_path
    extract.extract(charts["segments"], charts["model"], root / "extract",
                    extract.Params(device="cpu", cache_dir=None, shard_size=4))
    score.score(root / "extract", root / "score", score.Params())
    cluster.cluster(root / "extract", root / "cluster", cluster.Params(n_clusters=2))
    params = Params(methods=("grace",), fractions=(0.5,), variants=(), lora_layers=1, batch_tokens=512,
                    accuracy_problems=2, max_new_tokens=4, eval_batch_size=2, device="cpu", cache_dir=None)
    build_subsets(root / "score" / "step_scores.parquet", root / "extract", root / "no-unconditional.parquet",
                  charts["segments"], root / "cluster" / "clusters.parquet", root / "no-scorers", root / "no-warmup",
                  root / "subsets", params, score.Params(), aggregate.Params(), select.Params())
    with caplog.at_level("INFO"):
        stats = run_all(root / "subsets", charts["segments"], charts["test"], charts["model"], root / "runs", params,
                        ingest.Params(preset="sharegpt"))
    assert stats["runs"] == ["base", "grace-top50pct", "full"] and stats["trunk_cache"] is False
    assert "finetune_eval.trunk_cache: off" in caplog.text  # the fallback says why, once
    records = {name: json.loads((root / "runs" / f"{name}.json").read_text()) for name in stats["runs"]}
    assert [records[name]["n_train"] for name in stats["runs"]] == [0, N_POOL // 2, N_POOL]
    for record in records.values():
        assert record["eval"]["n_problems"] == N_TEST and len(record["eval"]["predictions"]) == 2
        assert record["eval"]["gold_loss"] > 0
    assert len({record["eval"]["gold_loss"] for record in records.values()}) == 3  # each run its own model
    assert report(root / "runs", root / "out", params) == {"rows": 3, "runs": 3}
    table = (root / "out" / "results.md").read_text(encoding="utf-8")
    for row in ("| base | 0% | 0 |", "| grace | 50% | 4 |", "| full | 100% | 8 |"):
        assert row in table


def test_generation_with_images_is_batched_like_one_at_a_time(charts, processor):
    model = train.load_model(charts["model"], "cpu")
    rows = pool_rows(charts)[:3]
    prompts = [train.render(processor, json.loads(row["prompt_messages"]), row["response"])[0] for row in rows]
    images = [image_paths(row["prompt_messages"]) for row in rows]
    together = evaluate.generate(model, processor, prompts, 5, 3, images)
    assert together == [evaluate.generate(model, processor, [p], 5, 1, [i])[0] for p, i in zip(prompts, images)]


def test_warmup_of_a_vlm_writes_a_model_extract_loads(charts, tmp_path):
    params = WarmupParams(fraction=0.5, epochs=2, learning_rate=1.0e-2, device="cpu", batch_tokens=512)
    stats = warmup(charts["segments"], charts["model"], tmp_path / "warmup", params)
    model_dir = tmp_path / "warmup" / "model"
    assert stats["n_warmup"] == N_POOL // 2 and stats["loss_last"] < stats["loss_first"]
    assert json.loads((model_dir / "model_info.json").read_text())["vision"] is True
    assert (charts["model"] / "processor_config.json").is_file()
    for name in TOKENIZER_FILES:  # the processor (image processor, template, tokenizer) as the base model's
        if (charts["model"] / name).exists():
            assert (model_dir / name).read_bytes() == (charts["model"] / name).read_bytes()
    VLMProxyModel(model_dir, "cpu")  # extract's loader, its logits probe included
    out = extract.extract(charts["segments"], model_dir, tmp_path / "extract", extract.Params(device="cpu",
                                                                                           cache_dir=None))
    assert out["kept"] == N_POOL
