"""A vision-language scorer (issue 16): METHOD.md 3 on the response tokens, the images as context only.

The model comes through transformers' own classes, AutoProcessor and AutoModelForImageTextToText
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL, SmolVLM/Idefics3, LLaVA, ...), no remote code unless model.trust_remote_code.
The proxy is taken where it is for a text model: at the language model's final hidden state
(`model.base_model(...).last_hidden_state`, what the LM head reads) and the LM head's weight; a model
whose logits are not head(h) is refused at load (ProxyModel._check_logits), as is one without a
linear LM head.

Span mapping with the processor. The processor expands each image placeholder of the rendered text
into the image's tokens, which moves every later token position. The text is tokenized with offsets
first, so each token gets its span exactly as for a text trace (tasks/curate/spans.py); the processor's own
ids are then taken, and since all images sit in the prompt, the response and the position that
predicts its first token are a suffix of both sequences: the expansion only shifts them, by the number
of added tokens. That suffix is checked token for token (else image_expansion_mismatch), so every
response token keeps exactly one step or answer span. The prompt is never cut: image tokens cannot be
truncated, so a multimodal trace longer than max_length is refused (response_exceeds_context).

Batching and memory: extract's batching (pack_batches, core/artifacts.py) counts the expanded
length, so the batch_tokens budget counts image tokens; pixels are made per batch in model_inputs
(never held for a shard) and a batch with images is waited for before the next is built, so one
batch of images is in memory and in flight at a time; on CUDA the forward runs under bf16 autocast
as for text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.curate.images import ImageRejected, image_file, image_paths, verified_images
from tasks.curate.proxy import ProxyModel
from tasks.curate.spans import EncodedTrace, SpanError, _check_spans, _fit, question_offset, token_spans


def is_vlm_dir(model_dir: Path) -> bool:
    """Whether a model directory holds a vision-language model (its config has a vision tower)."""
    config = Path(model_dir) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text(encoding="utf-8"))


def proxy_model(model_dir: Path, device: str) -> ProxyModel:
    """The scorer of a model directory: a VLMProxyModel for a vision-language model, else a ProxyModel."""
    return VLMProxyModel(model_dir, device) if is_vlm_dir(model_dir) else ProxyModel(model_dir, device)


@dataclass(frozen=True, slots=True)
class ImageTrace(EncodedTrace):
    """An EncodedTrace whose input_ids hold expanded image tokens, with what makes its pixels again."""

    text: str = ""  # the rendered chat, as the processor reads it
    images: tuple[str, ...] = ()  # image files, in placeholder order


def template_messages(prompt_messages: str | list[dict], response: str) -> list[dict]:
    """The chat as a processor's template reads it: image parts are {"type": "image"}, the response a string."""
    messages = []
    for message in json.loads(prompt_messages) if isinstance(prompt_messages, str) else prompt_messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if part["type"] == "image" else {"type": "text", "text": part["text"]}
                       for part in content]
        messages.append({**message, "content": content})
    return messages + [{"role": "assistant", "content": response}]


def load_images(paths) -> list:
    from PIL import Image

    loaded = []
    for path in paths:
        with Image.open(image_file(path)) as image:
            loaded.append(image.convert("RGB"))
    return loaded


def encode_multimodal(processor, traces: list[tuple[str, str, list[tuple[int, int]]]], *,
                      max_length: int | None) -> list[EncodedTrace | SpanError]:
    """Encode (prompt_messages JSON, scored_response, spans) triples with the processor (module docstring)."""
    tokenizer = processor.tokenizer
    results: list[EncodedTrace | SpanError] = []
    for prompt, response, spans in traces:
        text = processor.apply_chat_template(template_messages(prompt, response), tokenize=False)
        response_start = text.rfind(response)
        problem = _check_spans(spans, len(response))
        if response_start < 0:
            results.append(SpanError("response_not_in_template", "the processor's chat template does not "
                                     "reproduce the scored response verbatim"))
            continue
        if problem:
            results.append(SpanError("invalid_spans", problem))
            continue
        encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = np.array(encoding["input_ids"], dtype=np.int64)  # (n,) before expansion
        offsets = np.array(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (n, 2)
        labels = token_spans(text, offsets, (response_start, response_start + len(response)), spans)  # (n,)
        paths = tuple(image_paths(prompt))
        try:  # the files as ingest hashed them: a swapped image must not be scored under the old trace key
            loaded = verified_images(prompt)
        except ImageRejected as rejected:
            results.append(SpanError(rejected.reason, rejected.detail))
            continue
        inputs = processor(text=[text], images=[loaded] if paths else None, add_special_tokens=False)
        expanded = np.asarray(inputs["input_ids"][0], dtype=np.int64)  # (n + shift,)
        shift = len(expanded) - len(ids)
        response_tokens = np.flatnonzero(labels >= 0)
        if len(response_tokens) == 0:
            results.append(SpanError("empty_span_tokens", "the response has no tokens"))
            continue
        tail = max(int(response_tokens[0]) - 1, 0)  # the position predicting the first response token, on
        if shift < 0 or not np.array_equal(ids[tail:], expanded[tail + shift:]):
            results.append(SpanError("image_expansion_mismatch", "the processor's ids do not end with the text's "
                                     "response tokens: image expansion reached into the response"))
            continue
        labels = np.concatenate([np.full(tail + shift, -1, dtype=np.int32), labels[tail:]])  # (n + shift,)
        needed = int(response_tokens[-1]) + shift + 1
        if max_length is not None and needed > max_length:
            results.append(SpanError("response_exceeds_context", f"the trace with its image tokens needs {needed} "
                                     f"positions but max_length is {max_length}; images cannot be truncated"))
            continue
        question = int(np.searchsorted(offsets[:, 1], question_offset(prompt, text, response_start), side="right"))
        question = question + shift if question >= tail or np.array_equal(ids[question:], expanded[question + shift:]) \
            else 0
        encoded = _fit(expanded, labels, len(spans), needed, question)
        results.append(encoded if isinstance(encoded, SpanError) else
                       ImageTrace(**{name: getattr(encoded, name) for name in EncodedTrace.__slots__},
                                  text=text, images=paths))
    return results


# Processor outputs that are not pixel inputs: input_ids come from the encoded traces (collate).
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


class VLMProxyModel(ProxyModel):
    """ProxyModel on a vision-language model: the language model's final hidden state and its LM head."""

    mask_free = False  # image tokens may attend both ways (Gemma 3's token types): transformers builds the mask

    def _load(self, model_dir: Path):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        # backend="pil": the image processors that need no torchvision (the same numbers on every machine)
        self.processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear) or head.weight.shape[1] != model.config.get_text_config().hidden_size:
            raise ValueError(f"{type(model).__name__}: its output layer is {type(head).__name__}, not a linear LM head "
                             "on the language model's final hidden state; the gradient proxy needs one")
        return self.processor.tokenizer, model

    def encode(self, traces, *, chat_template: bool, max_length: int | None):
        """Multimodal (and text) traces through the processor; chat_template is always on for a VLM."""
        return encode_multimodal(self.processor, traces, max_length=max_length)

    def launch(self, traces: list[EncodedTrace], head_variant: bool):
        """ProxyModel.launch; a batch with images is waited for, so one image batch is in flight at a time."""
        pending = super().launch(traces, head_variant)
        if pending.event is not None and any(getattr(trace, "images", ()) for trace in traces):
            pending.event.synchronize()
        return pending

    def model_inputs(self, traces: list[EncodedTrace]) -> dict[str, torch.Tensor]:
        """Pixel inputs of one batch, made now (images in memory: this batch's only)."""
        return pixel_inputs(self.processor, [(trace.text, getattr(trace, "images", ())) for trace in traces])


def pixel_inputs(processor, texts: list[tuple[str, tuple[str, ...]]]) -> dict[str, torch.Tensor]:
    """The processor's pixel inputs (pixel_values, image_grid_thw, ...) of a batch of (text, image files); {} if none.

    Also the fine-tune's (tasks/finetune/train.py): the images of one batch are loaded now, never held longer."""
    with_images = [(text, images) for text, images in texts if images]
    if not with_images:
        return {}
    # per trace, in batch order: the order of the image tokens in the flattened input_ids
    inputs = processor(text=[text for text, _ in with_images],
                       images=[load_images(images) for _, images in with_images], add_special_tokens=False, padding=True, return_tensors="pt")
    return {name: value for name, value in inputs.items() if name not in TEXT_KEYS}
