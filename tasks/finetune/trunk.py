"""Frozen-trunk cache: compute the layers below the LoRA adapters once, reuse them in every run.

With LoRA on the last N decoder layers only (finetune_eval.lora_layers), the embeddings and the
first L-N layers never change: their output for an example is the same in every run of the table.
Computed once per stage invocation, it lets each fine-tuning step and each gold-loss pass run only
the top N layers and the LM head. On the bundled sample (SmolLM2-135M, N=4 of 30) that makes a
training step about 2x and a gold-loss pass about 4x cheaper; the table's CPU time drops by a third.

The top layers are run by the model's own decoder forward on `inputs_embeds` with its layer list
cut to the top N, so masks, rotary positions and the final norm are the model's own. A model whose
forward is not exactly "embeddings -> layers -> norm" (Gemma rescales inputs_embeds, for one) would
differ: `split_matches` compares the split forward with the full one on real examples, and the
caller uses the cache only if they agree. Memory: tokens x hidden size x 4 bytes (the sample's pool:
~390k tokens x 576 -> 0.9 GB); set finetune_eval.trunk_cache: false where that does not fit.

A vision-language model gets no cache (`refusal` says why; runs logs it in one line and runs the full
forward, vision tower included, at every step). The cut would sit inside its language model, but the
input of the top layers is not all a split forward needs there: Qwen2-VL-style models take 3-D
(M-RoPE) positions that their multimodal forward derives from the image grid and the ids, which the
language model alone on cached states never sees, and image tokens make the states several times the
text's size (a 224x224 chart is ~150-250 tokens of hidden size 1,536-2,048 in Qwen2/3-VL). Exact
only for some architectures, large for all: not worth its code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pathlib import Path

from tasks.core.artifacts import pack_batches
from tasks.core.progress import show_progress
from tasks.core.stage import module_logger
from tasks.curate.vlm import is_vlm_dir
from tasks.finetune.train import (Example, autocast, collate, decoder_layers, evaluation_precision, resolve_precision,
                                  trunk_end)

log = module_logger(__name__)


@torch.inference_mode()
def trunk_states(model, examples, end: int, batch_tokens: int, precision: str | None = None,
                 desc: str = "trunk") -> list[torch.Tensor]:
    """Per example: the (T, d) output of embeddings + layers[:end], the input of the top layers.

    Under the training's own precision: with bf16 autocast the trunk the steps would have run is a bf16 one,
    and fp32 states would train a (slightly) different model than the plain forward does."""
    device = str(next(model.parameters()).device)
    states: list[torch.Tensor | None] = [None] * len(examples)
    # the whole pool through the trunk: tens of minutes on a CPU, so it reports progress (tasks/core/progress.py)
    with decoder_layers(model, 0, end, final_norm=False), autocast(device, precision), \
            show_progress(desc, len(examples), "example", log) as progress:
        for indices in pack_batches([len(example.input_ids) for example in examples], batch_tokens):
            batch = collate([examples[i] for i in indices], 0, device)
            hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         use_cache=False).last_hidden_state  # (B, T, d)
            for row, index in enumerate(indices):  # right padding: a row's real tokens never saw its pads
                states[index] = hidden[row, : len(examples[index].input_ids)].float().cpu().clone()
            progress.update(len(indices))
    return states


@torch.inference_mode()
def split_matches(model, examples, states: list[torch.Tensor], end: int, pad_id: int,
                  precision: str | None = None) -> bool:
    """Does trunk state -> top layers give the full forward's final hidden states on these examples?

    Tolerance: 1e-4 in fp32; in bf16 (8-bit mantissa, rounding differs with the batch's shape) 5e-2, still far
    below what states from a wrong layer miss by (order 1)."""
    device = str(next(model.parameters()).device)
    atol = 5e-2 if resolve_precision(precision, device) == "bf16" else 1e-4
    batch = collate(examples, pad_id, device, states)
    with autocast(device, precision):
        full = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).last_hidden_state  # (B, T, d)
    with decoder_layers(model, end), autocast(device, precision):
        split = model.get_decoder()(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                                    use_cache=False).last_hidden_state  # (B, T, d)
    real = batch["attention_mask"].bool()  # (B, T): padded positions are never scored
    return bool(torch.allclose(full[real].float(), split[real].float(), atol=atol, rtol=atol))


def refusal(model_dir: Path) -> str | None:
    """Why a model directory gets no trunk cache whatever the settings (a vision-language model), else None."""
    if is_vlm_dir(model_dir):
        return (f"{model_dir} is a vision-language model: its split forward is not exact in general (M-RoPE "
                "positions come from the image grid) and image tokens make the states large; full forward per step")
    return None


@dataclass(frozen=True)
class TrunkCache:
    end: int  # index of the first top (adapted) layer
    pool: dict[str, torch.Tensor]  # training example id -> (T, d) trunk output
    test: list[torch.Tensor]  # per test problem, in evaluation order


def prepare(model, pool: dict[str, Example], test: list[Example], params, pad_id: int) -> TrunkCache | None:
    """The trunk outputs of every pool and test example, from the base model; None where no frozen
    trunk exists (mode full, LoRA on every layer) or where the split forward is not exact for this model."""
    end = trunk_end(model, params)
    if end is None:
        return None
    device = str(next(model.parameters()).device)
    precision = getattr(params, "precision", None)
    evaluation = evaluation_precision(precision, device)  # the test states feed evaluation, not training
    pool_states = trunk_states(model, list(pool.values()), end, params.batch_tokens, precision, "trunk (pool)")
    test_states = trunk_states(model, test, end, params.batch_tokens, evaluation, "trunk (test)")
    for examples, states, used in ((list(pool.values()), pool_states, precision), (test, test_states, evaluation)):
        if examples and not split_matches(model, examples[:4], states[:4], end, pad_id, used):
            return None
    return TrunkCache(end, dict(zip(pool, pool_states)), test_states)
