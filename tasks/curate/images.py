"""Images of multimodal traces (issue 16): where ingest finds them, how it checks and hashes them.

Layouts read (a record with none of them is a text record, ingested exactly as before):
  - an `images` (list) or `image` (one) field: paths relative to ingest.image_root (null = the input
    file's directory), or {"bytes", "path"} dicts as a Hugging Face Image feature gives them. "<image>"
    placeholders in the prompt turns (LLaVA) say where each image goes, in order; with none, all
    images open the first user turn.
  - chat `messages` whose content is a list of parts, {"type": "text", "text"} and {"type": "image",
    "image" | "path" | "url": source} or {"type": "image_url", "image_url": {"url"}}; an image part with
    no source takes the next entry of the `images` field (TRL's layout).
In the trace a turn holding images has list content: {"type": "text", "text"} and {"type": "image",
"image": path, "sha256": hex digest of the file's bytes}. prompt_messages thus carries the digest, so
content_hash, the per-trace extraction cache and DVC all see an edited image; a text trace keeps its
string contents and its bytes. Embedded bytes (Image features) are written once to
<ingest out>/images/<sha256>.<format>, so every later stage reads images from files.
Where an image is recorded (recorded_path, the one place that decides it; image_file reads it back):
relative to the working directory when the file lies inside it, else absolute. `dvc repro` runs every
stage from the repository root (dvc.yaml's directory) and the Prefect flow runs them all in one
process, so the working directory is the checkout: two clones write the same bytes (DVC's hashes, run
cache and `dvc pull` match across machines) and the exports name files inside any clone. A file
outside the checkout (a shared mount) has no checkout-independent name but its absolute one.
An image that is missing, unreadable or not an image is refused: reasons image_missing,
image_unreadable; a count of placeholders that does not match the images: image_placeholder_mismatch.
Refused before anything is opened (issue 22): a path that leaves image_root once `~`, `..` and symlinks are
resolved (image_outside_root: ingest never reads /etc/passwd), a path the file system cannot hold (a NUL
byte, a name too long: image_path_invalid), embedded bytes that are not bytes (wrong_type). Refused from the
header alone, before decoding: more than ingest.max_image_pixels pixels (image_too_large; a decompression
bomb claims 20000x20000 in a few hundred bytes). An image in the response (the assistant turn) is refused:
image_in_response. Readers check the bytes against the recorded sha256 (verified_images): a file changed
since ingest is image_changed, one that no longer opens image_unreadable.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import html
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

PLACEHOLDER = "<image>"
IMAGE_FIELDS = ("images", "image")


class ImageRejected(Exception):
    """A record whose images cannot be used: `reason` is the quarantine code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image", "image_url")


def has_images(record: dict, messages_field: str | None) -> bool:
    """Whether a record is multimodal: an image field, or a chat turn whose content is a list with an image part."""
    if any(record.get(name) is not None for name in IMAGE_FIELDS):
        return True
    messages = record.get(messages_field) if messages_field else None
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(map(_is_image_part, m["content"]))
        for m in messages)


def _field_sources(record: dict) -> list[Any]:
    for name in IMAGE_FIELDS:
        value = record.get(name)
        if value is not None:
            return list(value) if isinstance(value, list) else [value]
    return []


def _part_source(part: dict) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    return next((part[key] for key in ("image", "path", "url") if part.get(key) is not None), None)


def flatten(record: dict, messages_field: str | None) -> tuple[dict, list[Any]]:
    """(the record with every list content joined to a string holding "<image>" placeholders, image sources in order)."""
    field_sources = _field_sources(record)
    messages = record.get(messages_field) if messages_field else None
    if not isinstance(messages, list) or not any(isinstance(m, dict) and isinstance(m.get("content"), list)
                                                 for m in messages):
        return record, field_sources
    sources, pending = [], iter(field_sources)
    flat = copy.copy(record)
    flat[messages_field] = []
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            text = []
            for part in message["content"]:
                if _is_image_part(part):
                    source = _part_source(part)
                    sources.append(source if source is not None else next(pending, None))
                    text.append(PLACEHOLDER)
                elif isinstance(part, dict) and isinstance(part.get("text"), str):
                    text.append(part["text"])
                else:
                    raise ImageRejected("wrong_type", f"a content part {part!r:.80} is neither text nor an image")
            message = {**message, "content": "".join(text)}
        flat[messages_field].append(message)
    if any(source is None for source in sources):
        raise ImageRejected("image_missing", "an image part has no source and the images field has no entry left")
    return flat, sources


def recorded_path(path: Path) -> str:
    """How a trace names an image file: relative to the working directory inside it, else absolute (module docstring)."""
    cwd = Path.cwd()
    # abspath first keeps a symlink inside the checkout as it is; resolve() then catches a path that reaches
    # the checkout through a symlinked spelling of it (cwd is always the physical directory)
    for absolute, base in ((Path(os.path.abspath(path)), cwd), (Path(path).resolve(), cwd.resolve())):
        if absolute.is_relative_to(base):
            return absolute.relative_to(base).as_posix()
    return Path(os.path.abspath(path)).as_posix()


def image_file(recorded: str) -> Path:
    """The file a recorded image path names, for every reader (extract, report, export's consumers).

    A relative path is read against the working directory: the stage's, the same checkout that ingest
    ran in (a remote Dask worker must be started from the repository root too)."""
    return Path(recorded)


def verified_images(prompt_messages: str | list[dict]) -> list:
    """The RGB images of a trace's prompt, each checked against the sha256 ingest recorded; raises ImageRejected:
    image_missing, image_changed (its bytes differ: numbers computed now would be cached under the old
    image's trace key), image_unreadable."""
    from PIL import Image

    messages = json.loads(prompt_messages) if isinstance(prompt_messages, str) else prompt_messages
    loaded = []
    for part in (part for message in messages if isinstance(message["content"], list)
                 for part in message["content"] if part["type"] == "image"):
        try:
            data = image_file(part["image"]).read_bytes()
        except OSError as err:
            raise ImageRejected("image_missing", f"image {part['image']}: {err.strerror}") from None
        if part.get("sha256") and hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise ImageRejected("image_changed", f"image {part['image']} changed since ingest (sha256 "
                                f"{part['sha256'][:12]}... recorded); run ingest again")
        try:
            with Image.open(io.BytesIO(data)) as image:
                loaded.append(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise ImageRejected("image_unreadable", f"image {part['image']} no longer opens: {err}") from None
    return loaded


EMBED_README = ("Images that the input dataset embedded as bytes (a Hugging Face `Image` column), written out by\n"
                "ingest and named by the sha256 of their bytes; traces.parquet refers to them. A pool whose images\n"
                "are files, or a text pool, has none here.\n")


class ImageStore:
    """Resolves image sources to checked files with their sha256; embedded bytes are written under embed_dir."""

    def __init__(self, root: Path, embed_dir: Path | None = None, published_dir: Path | None = None,
                 max_pixels: int | None = None) -> None:
        # embed_dir: where embedded bytes are written now; published_dir: where they will be read from, which
        # differs while ingest writes into atomic_outputs' staging copy of its directory
        self.root, self.embed_dir, self.max_pixels = Path(root).expanduser(), embed_dir, max_pixels
        self.real_root = Path(os.path.realpath(self.root))  # every file read must lie under it
        self.published_dir = published_dir if published_dir is not None else embed_dir
        if embed_dir is not None:
            # made even when no image is embedded (a text pool): dvc.yaml declares it an out of ingest. Its
            # README says what it holds, and keeps it from being empty: DVC warns "'outputs/ingest/images' is
            # empty." on every `dvc repro` of a text pool otherwise, a warning that means nothing there
            embed_dir.mkdir(parents=True, exist_ok=True)
            (embed_dir / "README.md").write_text(EMBED_README, encoding="utf-8")
        self.digests: dict[str, str] = {}  # path -> sha256, so an image shared by many records is read once
        self.written = 0  # embedded images written to embed_dir

    def _check(self, data: bytes, where: str) -> str:
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                # the size is checked against max_pixels below, from the header; Pillow's own bomb warning
                # (MAX_IMAGE_PIXELS) would only repeat it. Its error (twice that) is caught as image_too_large
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    image_format, (width, height) = image.format, image.size
                    if self.max_pixels is not None and width * height > self.max_pixels:
                        raise ImageRejected("image_too_large", f"{where} is {width}x{height}, more than "
                                            f"ingest.max_image_pixels {self.max_pixels} pixels")
                    image.load()  # decodes the pixels: a truncated or corrupt file fails here, not in extract
        except Image.DecompressionBombError as err:
            raise ImageRejected("image_too_large", f"{where}: {err}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
            raise ImageRejected("image_unreadable", f"{where} is not a readable image: {err}") from None
        return (image_format or "png").lower()

    def _confined(self, source: str) -> tuple[Path, Path]:
        """(the path as given under root, the real file it names); raises ImageRejected before any read
        when the path leaves image_root once `~`, `..` and every symlink are resolved, or cannot be a path."""
        if "\0" in source:
            raise ImageRejected("image_path_invalid", f"image path {source!r:.80} holds a NUL byte")
        path = Path(source).expanduser()
        path = path if path.is_absolute() else self.root / path
        try:
            real = Path(os.path.realpath(path))
        except OSError as err:  # a loop of symlinks, a component the file system cannot hold
            raise ImageRejected("image_path_invalid", f"image path {source!r:.80}: {err.strerror}") from None
        if not real.is_relative_to(self.real_root):
            raise ImageRejected("image_outside_root", f"image {source!r:.80} lies outside ingest.image_root "
                                f"{str(self.root)!r} (it resolves to {real})")
        return path, real

    def resolve(self, source: Any) -> dict:
        """One image part {"type": "image", "image": path, "sha256"}; raises ImageRejected."""
        if isinstance(source, dict) and source.get("bytes") is not None:
            data = source["bytes"]
            if not isinstance(data, (bytes, bytearray)):  # JSON has no bytes: a string or a number is no image
                raise ImageRejected("wrong_type", f"embedded image bytes are {type(data).__name__}, not bytes")
            data = bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            extension = self._check(data, f"embedded image {source.get('path') or digest[:12]}")
            if self.embed_dir is None:
                raise ImageRejected("image_missing", "an embedded image needs ingest's output directory to be written to")
            path = self.embed_dir / f"{digest}.{extension}"
            if not path.exists():
                path.write_bytes(data)
                self.written += 1
            return {"type": "image", "image": recorded_path(self.published_dir / path.name), "sha256": digest}
        if isinstance(source, dict):
            source = source.get("path")
        if not isinstance(source, str) or not source.strip():
            raise ImageRejected("image_missing", f"image source {source!r:.80} is not a path")
        if source.startswith(("http://", "https://", "data:")):
            raise ImageRejected("image_missing", f"image {source:.80} is a URL; download it and give a path")
        path, real = self._confined(source)
        key = recorded_path(path)
        if key not in self.digests:
            try:
                if not real.is_file():  # also refuses a device or a FIFO, which could block or never end
                    raise ImageRejected("image_missing", f"image {source} not found (looked at {path})")
                data = real.read_bytes()
            except OSError as err:  # ENAMETOOLONG, EACCES, EISDIR...: this record's problem, not the run's
                reason = "image_path_invalid" if err.errno == errno.ENAMETOOLONG else "image_unreadable"
                raise ImageRejected(reason, f"image {source!r:.80}: {err.strerror}") from None
            self._check(data, f"image {source}")
            self.digests[key] = hashlib.sha256(data).hexdigest()
        return {"type": "image", "image": key, "sha256": self.digests[key]}


def place(prompt: list[dict], sources: list[Any], store: ImageStore) -> list[dict]:
    """Prompt turns with "<image>" placeholders (or none) -> turns whose image-holding contents are part lists."""
    parts = [store.resolve(source) for source in sources]
    marked = sum(m["content"].count(PLACEHOLDER) for m in prompt)
    if marked == 0 and parts:  # LLaVA without placeholders: the images open the first user turn
        first = next(i for i, m in enumerate(prompt) if m["role"] == "user")
        prompt = [*prompt[:first], {**prompt[first], "content": PLACEHOLDER + prompt[first]["content"]},
                  *prompt[first + 1:]]
    elif marked != len(parts):
        raise ImageRejected("image_placeholder_mismatch",
                            f"the prompt has {marked} {PLACEHOLDER} placeholder(s) for {len(parts)} image(s)")
    images, turns = iter(parts), []
    for message in prompt:
        if PLACEHOLDER not in message["content"]:
            turns.append(message)
            continue
        content = []
        for index, text in enumerate(message["content"].split(PLACEHOLDER)):
            if index:
                content.append(next(images))
            if text:
                content.append({"type": "text", "text": text})
        turns.append({**message, "content": content})
    return turns


def text_of(content: str | list[dict]) -> str:
    """A turn's text without its images."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


def image_paths(prompt_messages: str | list[dict]) -> list[str]:
    """The image files of a trace's prompt as recorded (recorded_path), in order; [] for a text trace."""
    messages = json.loads(prompt_messages) if isinstance(prompt_messages, str) else prompt_messages
    return [part["image"] for message in messages if isinstance(message["content"], list)
            for part in message["content"] if part["type"] == "image"]


def raw_record(record: dict) -> dict:
    """The input record with embedded image bytes left out (their files are in the prompt's parts)."""
    clean = dict(record)
    for name in IMAGE_FIELDS:
        value = clean.get(name)
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, dict) and item.get("bytes") is not None for item in items):
            clean[name] = [{"path": item.get("path")} if isinstance(item, dict) else item for item in items]
    return clean


def placeholder_text(content: str | list[dict]) -> str:
    """A turn's text with "<image>" where each image was (LLaVA, LLaMA-Factory and Alpaca-with-images layouts)."""
    if isinstance(content, str):
        return content
    return "".join(PLACEHOLDER if part["type"] == "image" else part["text"] for part in content)


def sft_turns(prompt: list[dict]) -> list[dict]:
    """Prompt turns as TRL's SFTTrainer reads a multimodal chat: {"type": "image"} parts, the files in "images"."""
    return [{**m, "content": [{"type": "image"} if part["type"] == "image" else part for part in m["content"]]}
            if isinstance(m["content"], list) else m for m in prompt]


def thumbnails_html(prompt_messages: str, size: int = 160) -> str:
    """<img> thumbnails (inline PNG data URIs, so the report stays one file) of a trace's images; "" for text."""
    paths = image_paths(prompt_messages)
    if not paths:
        return ""
    import base64

    from PIL import Image

    tags = []
    for path in paths:
        try:
            with Image.open(image_file(path)) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
        except OSError:
            tags.append(f'<span class="meta">[image {html.escape(path)} not readable now]</span>')
            continue
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        tags.append(f'<img class="thumb" src="data:image/png;base64,{data}" alt="{html.escape(path)}" '
                    f'title="{html.escape(path)}" style="max-width:{size}px;border:1px solid #ccc;margin:.3em .3em 0 0">')
    return "".join(tags)
