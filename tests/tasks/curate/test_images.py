"""Multimodal ingest (tasks/curate/images.py): the layouts with images, quarantine of bad images, the hash over image bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.core.stage import read_quarantine
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
    quarantine = read_quarantine(tmp_path / "out" / "quarantine.jsonl")
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
    # only its README: an empty directory out is what DVC warns about on every repro
    assert [p.name for p in (tmp_path / "out" / "images").iterdir()] == ["README.md"]


# ---- issue 22: image reads confined to image_root, one bad image never stops the run ---------------------------
def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height in a few dozen bytes: a decompression bomb as far as a header goes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def gif_header(side: int) -> bytes:
    import struct

    return (b"GIF89a" + struct.pack("<HHBBB", side, side, 0, 0, 0) + b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0)
            + b"\x02\x02\x44\x01\x00\x3b")


def tiff_header(side: int) -> bytes:
    import struct

    tags = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8),
            (277, 3, 1, 1), (278, 4, 1, side), (279, 4, 1, 1)]
    return (b"II*\x00" + struct.pack("<IH", 8, len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags)
            + struct.pack("<I", 0))


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """Every file read through Path.read_bytes, resolved: what ingest opened."""
    seen: list[Path] = []
    original = Path.read_bytes

    def recording(self):
        seen.append(Path(os.path.realpath(self)))
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", recording)
    return seen


def test_image_paths_leaving_the_root_are_quarantined_before_they_are_read(tmp_path, monkeypatch, reads):
    root = tmp_path / "root"
    write_png(root / "a.png")
    secret = write_png(tmp_path / "secret.png", "red")  # a real image: without confinement it would be kept
    write_png(tmp_path / "home" / "mine.png")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (root / "out.png").symlink_to(secret)  # a symlink inside the root, pointing out of it
    (root / "in.png").symlink_to(root / "a.png")  # one that stays inside is fine
    rows = [{"id": "dotdot", "image": "../secret.png"}, {"id": "absolute", "image": str(secret)},
            {"id": "home", "image": "~/mine.png"}, {"id": "symlink", "image": "out.png"},
            {"id": "passwd", "image": "/etc/passwd"}, {"id": "environ", "image": "/proc/self/environ"},
            {"id": "sneaky", "image": "sub/../../secret.png"},
            {"id": "inside-absolute", "image": str(root / "a.png")}, {"id": "inside-link", "image": "in.png"}]
    traces, quarantine, stats = run(tmp_path, [{**row, "question": "Q?", "response": RESPONSE} for row in rows],
                                    image_root=str(root))
    assert sorted(t["id"] for t in traces) == ["inside-absolute", "inside-link"]
    assert {q["id"]: q["reason"] for q in quarantine} == {
        name: "image_outside_root" for name in ("dotdot", "absolute", "home", "symlink", "passwd", "environ", "sneaky")}
    assert all(path.is_relative_to(root.resolve()) for path in reads), reads  # nothing outside was even opened
    assert stats["read"] == stats["kept"] + stats["quarantined"] == len(rows)


def test_a_bad_image_record_is_quarantined_and_the_rest_kept(tmp_path):
    """Decompression bombs, embedded bytes JSON cannot hold, a NUL byte or an overlong path: one record each."""
    root = tmp_path / "imgs"
    write_png(root / "ok.png")
    (root / "bomb.png").write_bytes(png_header(20000, 20000))  # past Pillow's own bomb limit
    (root / "bomb.gif").write_bytes(gif_header(30000))
    (root / "bomb.tif").write_bytes(tiff_header(40000))
    (root / "big.png").write_bytes(png_header(12000, 12000))  # 144 megapixels: Pillow only warns; our cap refuses
    rows = [{"id": "png", "image": "bomb.png"}, {"id": "gif", "image": "bomb.gif"}, {"id": "tif", "image": "bomb.tif"},
            {"id": "big", "image": "big.png"}, {"id": "string-bytes", "images": [{"bytes": "iVBORw0KGgo="}]},
            {"id": "int-bytes", "images": [{"bytes": 123}]}, {"id": "nul", "image": "ok\0.png"},
            {"id": "long", "image": "x" * 5000 + ".png"}, {"id": "long-name", "image": "y" * 300 + ".png"},
            {"id": "fine", "image": "ok.png"}]
    traces, quarantine, stats = run(tmp_path, [{**row, "question": "Q?", "response": RESPONSE} for row in rows],
                                    image_root=str(root))
    assert [t["id"] for t in traces] == ["fine"]
    assert {q["id"]: q["reason"] for q in quarantine} == {
        "png": "image_too_large", "gif": "image_too_large", "tif": "image_too_large", "big": "image_too_large",
        "string-bytes": "wrong_type", "int-bytes": "wrong_type", "nul": "image_path_invalid",
        "long": "image_path_invalid", "long-name": "image_path_invalid"}
    assert "ingest.max_image_pixels" in next(q["detail"] for q in quarantine if q["id"] == "big")
    assert stats["read"] == stats["kept"] + stats["quarantined"] == len(rows)


def test_max_image_pixels_caps_decoded_pixels(tmp_path):
    write_png(tmp_path / "wide.png", size=(300, 200))
    rows = [{"id": "w", "image": "wide.png", "question": "Q?", "response": RESPONSE}]
    with pytest.raises(Exception, match="kept none"):  # the only record is refused, so the stage stops
        run(tmp_path, rows, max_image_pixels=300 * 200 - 1)
    traces, _, _ = run(tmp_path, rows, max_image_pixels=300 * 200)
    assert [t["id"] for t in traces] == ["w"]
    traces, _, _ = run(tmp_path, rows, max_image_pixels=None)
    assert [t["id"] for t in traces] == ["w"]
    from tasks.core.stage import ParamsError, params_from_dict

    with pytest.raises(ParamsError, match="ingest.max_image_pixels"):
        params_from_dict(Params, "ingest", {"max_image_pixels": 0})


def test_an_image_in_the_response_is_quarantined_not_moved(tmp_path):
    """An image part in the assistant turn was moved into the user turn, leaving "<image>" in the response."""
    write_png(tmp_path / "a.png")
    rows = [{"id": "in-answer", "messages": [
        {"role": "user", "content": "How tall is the bar?"},
        {"role": "assistant", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": RESPONSE}]}]},
        {"id": "fine", "image": "a.png", "question": "Q?", "response": RESPONSE}]
    traces, quarantine, _ = run(tmp_path, rows)
    assert [t["id"] for t in traces] == ["fine"]
    assert [(q["id"], q["reason"]) for q in quarantine] == [("in-answer", "image_in_response")]
