"""Multimodal ingest (tasks/curate/images.py): the layouts with images, quarantine of bad images, the hash over image bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.curate.images import image_file, image_paths, thumbnails_html
from tasks.curate.ingest import Params, ingest
from tasks.curate.vlm import load_images


def write_png(path: Path, colour: str = "white", size: tuple[int, int] = (40, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def run(tmp_path: Path, rows: list[dict], **params) -> tuple[list[dict], list[dict], dict]:
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    stats = ingest(pool, tmp_path / "out", Params(**{"image_root": str(tmp_path), **params}))
    traces = pq.read_table(tmp_path / "out" / "traces.parquet").to_pylist()
    quarantine = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    return traces, quarantine, stats


RESPONSE = "The bar is 3 tall.\nThe answer is 3."


def test_llava_conversations_with_placeholder(tmp_path):
    write_png(tmp_path / "imgs" / "a.png")
    rows = [{"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nHow tall is the bar?"}, {"from": "gpt", "value": RESPONSE}]}]
    traces, quarantine, stats = run(tmp_path, rows, preset="sharegpt", image_root=str(tmp_path / "imgs"))
    assert quarantine == [] and stats["kept"] == 1
    prompt = json.loads(traces[0]["prompt_messages"])
    content = prompt[0]["content"]
    assert content[0]["type"] == "image" and content[0]["image"] == str(tmp_path / "imgs" / "a.png")
    assert len(content[0]["sha256"]) == 64
    assert content[1] == {"type": "text", "text": "\nHow tall is the bar?"}
    assert traces[0]["question"] == "How tall is the bar?" and traces[0]["final_answer"] == "3"
    assert stats["images_read"] == 1


def test_image_without_placeholder_opens_the_user_turn(tmp_path):
    write_png(tmp_path / "a.png")
    traces, quarantine, _ = run(tmp_path, [{"id": "a", "images": ["a.png"], "question": "How tall?",
                                            "response": RESPONSE}])
    assert quarantine == []
    content = json.loads(traces[0]["prompt_messages"])[0]["content"]
    assert [part["type"] for part in content] == ["image", "text"] and content[1]["text"] == "How tall?"
    assert image_paths(traces[0]["prompt_messages"]) == [str(tmp_path / "a.png")]


def test_messages_with_image_parts_and_trl_images_field(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png", "black")
    rows = [{"id": "parts", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": [{"type": "text", "text": RESPONSE}]}]},
        {"id": "trl", "images": ["b.png"], "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"}]},
            {"role": "assistant", "content": RESPONSE}]}]
    traces, quarantine, _ = run(tmp_path, rows)
    assert quarantine == []
    by_id = {t["id"]: t for t in traces}
    assert by_id["parts"]["response"] == RESPONSE
    assert image_paths(by_id["trl"]["prompt_messages"]) == [str(tmp_path / "b.png")]
    assert json.loads(by_id["trl"]["prompt_messages"])[0]["content"][0] == {"type": "text", "text": "Look: "}


def test_missing_unreadable_and_mismatched_images_are_quarantined(tmp_path):
    (tmp_path / "not.png").write_text("this is text, not a PNG")
    write_png(tmp_path / "ok.png")
    rows = [{"id": "missing", "image": "nowhere.png", "question": "Q?", "response": RESPONSE},
            {"id": "text-file", "image": "not.png", "question": "Q?", "response": RESPONSE},
            {"id": "two-marks", "image": "ok.png", "question": "<image> and <image>?", "response": RESPONSE},
            {"id": "fine", "image": "ok.png", "question": "Q?", "response": RESPONSE}]
    traces, quarantine, stats = run(tmp_path, rows)
    assert [t["id"] for t in traces] == ["fine"]
    assert {q["id"]: q["reason"] for q in quarantine} == {
        "missing": "image_missing", "text-file": "image_unreadable", "two-marks": "image_placeholder_mismatch"}
    assert stats["read"] == stats["kept"] + stats["quarantined"] == 4


def test_content_hash_covers_the_image_bytes(tmp_path):
    rows = [{"image": "a.png", "question": "How tall?", "response": RESPONSE}]
    write_png(tmp_path / "a.png", "white")
    before, _, _ = run(tmp_path, rows)
    write_png(tmp_path / "a.png", "red")  # same path, edited image
    after, _, _ = run(tmp_path, rows)
    assert before[0]["content_hash"] != after[0]["content_hash"]
    assert before[0]["id"] != after[0]["id"]  # ids from the hash follow it


def test_hf_dataset_with_image_feature(tmp_path):
    import datasets

    write_png(tmp_path / "src.png", "blue")
    data = datasets.Dataset.from_dict({"id": ["hf-1"], "question": ["How tall?"], "response": [RESPONSE],
                                       "images": [[str(tmp_path / "src.png")]]},
                                      features=datasets.Features({"id": datasets.Value("string"),
                                                                  "question": datasets.Value("string"),
                                                                  "response": datasets.Value("string"),
                                                                  "images": [datasets.Image()]}))
    data.save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "src.png").unlink()  # the dataset holds the bytes themselves
    stats = ingest(tmp_path / "hf", tmp_path / "out", Params(image_root=str(tmp_path)))
    traces = pq.read_table(tmp_path / "out" / "traces.parquet").to_pylist()
    assert stats["kept"] == 1 and stats["images_embedded"] == 1
    (path,) = image_paths(traces[0]["prompt_messages"])
    assert Path(path).parent == tmp_path / "out" / "images" and Path(path).is_file()
    assert "bytes" not in traces[0]["raw"]


def test_text_records_do_not_get_image_stats(tmp_path):
    _, _, stats = run(tmp_path, [{"id": "t", "question": "Q?", "response": RESPONSE}])
    assert "images_read" not in stats


def test_without_image_root_image_fields_are_ignored_as_before(tmp_path):
    rows = [{"id": "a", "image": "nowhere.png", "question": "How tall?", "response": RESPONSE}]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    stats = ingest(pool, tmp_path / "out", Params())
    trace = pq.read_table(tmp_path / "out" / "traces.parquet").to_pylist()[0]
    assert stats["kept"] == 1 and json.loads(trace["prompt_messages"]) == [{"role": "user", "content": "How tall?"}]


def write_clone(root: Path) -> Path:
    """A checkout's data: a LLaVA pool with its image files, and a HF dataset embedding the same image's bytes."""
    import datasets

    write_png(root / "data" / "mm" / "a.png", "green")
    write_jsonl(root / "data" / "mm" / "pool.jsonl",
                [{"id": "a", "image": "a.png", "question": "How tall?", "response": RESPONSE}])
    features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "response": datasets.Value("string"), "images": [datasets.Image()]})
    datasets.Dataset.from_dict({"id": ["hf-1"], "question": ["How tall?"], "response": [RESPONSE],
                                "images": [[str(root / "data" / "mm" / "a.png")]]},
                               features=features).save_to_disk(str(root / "data" / "hf"))
    return root


def test_two_clones_write_the_same_bytes_and_find_their_own_images(tmp_path, monkeypatch):
    """Image paths are recorded relative to the checkout (images.recorded_path), so traces.parquet, its DVC hash
    and the exports do not depend on where the repository lies, whether the paths are given relative or absolute."""
    written: dict[str, list[bytes]] = {"pool.jsonl": [], "hf": []}
    for clone, spell in ((tmp_path / "one", lambda p: p), (tmp_path / "elsewhere" / "two", lambda p: Path.cwd() / p)):
        write_clone(clone)
        monkeypatch.chdir(clone)
        for source in written:
            out = spell(Path("outputs") / source)
            stats = ingest(spell(Path("data") / ("mm/pool.jsonl" if source == "pool.jsonl" else source)), out,
                           Params(image_root=str(spell(Path("data/mm")))))
            assert stats["kept"] == 1
            written[source].append((out / "traces.parquet").read_bytes())
            (prompt,) = pq.read_table(out / "traces.parquet", columns=["prompt_messages"]).column(0).to_pylist()
            (path,) = image_paths(prompt)
            assert path == ("data/mm/a.png" if source == "pool.jsonl" else f"outputs/hf/images/{path.split('/')[-1]}")
            assert image_file(path).resolve().is_relative_to(clone.resolve())  # this clone's file, not the other's
            assert load_images([path])[0].size == (40, 30) and "<img" in thumbnails_html(prompt)  # extract, report
    assert all(one == two for one, two in written.values())


def test_a_text_pool_still_gets_the_images_directory(tmp_path):
    run(tmp_path, [{"id": "t", "question": "Q?", "response": RESPONSE}], image_root=None)
    assert (tmp_path / "out" / "images").is_dir() and not any((tmp_path / "out" / "images").iterdir())
