"""Model stage helpers for a vision-language source (issue 16): recognise it, load it with its processor.

Apart from tasks/curate/vlm.py (the scorer) so the model stage does not import the proxy code.
"""

from __future__ import annotations

import torch


def is_vlm_source(source: str, revision: str | None, trust_remote_code: bool) -> bool:
    """Whether a model source (local directory or hub id) is an image-text-to-text model (model stage)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False  # model.check_causal_lm then says what the source holds instead
    remote = "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {})
    return hasattr(config, "vision_config") and (config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
                                                 or remote)


def load_vlm_and_processor(source: str, load_kwargs: dict):
    """(model, processor) of a vision-language source; the processor's tokenizer must be fast (offsets)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(source, **load_kwargs)
    processor = AutoProcessor.from_pretrained(source, backend="pil", **load_kwargs)
    if not getattr(processor, "tokenizer", None) or not processor.tokenizer.is_fast:
        raise ValueError(f"model.source={source}: the processor has no fast tokenizer; extract maps steps to tokens "
                         "with offset mappings, which need one")
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        raise ValueError(f"model.source={source}: {type(model).__name__} has no linear LM head on the language "
                         "model's final hidden state; the gradient proxy needs one")
    return model, processor
