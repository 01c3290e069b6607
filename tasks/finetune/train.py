"""Supervised fine-tuning of the base model on one subset: LoRA (peft) or all parameters.

An example is the model's chat template around the prompt turns and the assistant's response; the
loss is the mean token NLL of the response and its end-of-turn token only (the prompt is context,
as in METHOD.md 4). Batches are length-bucketed (similar lengths together, so little padding) and
visited in a seeded random order; AdamW with linear warm-up, then cosine or linear decay; bf16
autocast on CUDA, fp32 on CPU (CPU bf16 matmuls measured slower here).

`lora_layers: N` puts LoRA adapters on the last N decoder layers only. Autograd then records
nothing below them, so backward stops there; with the frozen-trunk cache (tasks/finetune/trunk.py) the
layers below are not even run again: a step costs the top N layers and the LM head. Logits are computed only at positions that predict a response token: the LM head (vocab x d) is
the single largest matmul of a small model, and prompt positions carry no loss.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tasks.core.artifacts import pack_batches

IGNORE = -100  # label of a position that has no loss (prompt, padding)


@dataclass(frozen=True, slots=True)
class Example:
    input_ids: tuple[int, ...]
    n_prompt: int  # leading tokens that are context only
    truncated: bool  # the prompt (or, if the response alone is too long, the response's end) was cut


def resolve_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def autocast(device: str):
    """bf16 autocast on CUDA (fp32 master weights); nothing on CPU."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_model(model_dir: Path, device: str):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
        raise ValueError(f"{model_dir}: the model post-processes its logits (softcapping or scaling), which "
                         "response_nll does not reproduce; use a model without it")
    return model.eval()


def padding_id(tokenizer) -> int:
    """The padding token; end-of-sequence where the tokenizer has none (padding is masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def render(tokenizer, prompt_messages: list[dict], response: str) -> tuple[str, str]:
    """(prompt text ready for generation, completion text = response + end of turn), templated."""
    eos = tokenizer.eos_token or ""
    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(message["content"] for message in prompt_messages) + "\n", response + eos
    prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_messages + [{"role": "assistant", "content": response}],
                                         tokenize=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    # Templates that render a finished turn differently from a generation prompt (e.g. a thinking
    # block only in one of them): train on exactly what generation will continue from.
    return prompt, response + eos


def encode(tokenizer, prompt_messages: list[dict], response: str, max_seq_len: int) -> Example:
    """Token ids of prompt + completion; too long: the prompt loses its start first (as in extract)."""
    prompt, completion = render(tokenizer, prompt_messages, response)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    kept_completion = completion_ids[: max_seq_len - 1]  # at least one prompt token predicts the first
    kept_prompt = prompt_ids[max(0, len(prompt_ids) - (max_seq_len - len(kept_completion))):]
    truncated = len(kept_prompt) < len(prompt_ids) or len(kept_completion) < len(completion_ids)
    return Example(tuple(kept_prompt + kept_completion), len(kept_prompt), truncated)


def collate(examples: list[Example], pad_id: int, device: str,
            states: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on prompt and padding), each (B, T);
    with trunk `states` (one (T_i, d) per example, tasks/finetune/trunk.py) also inputs_embeds (B, T, d)."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, example.n_prompt: len(ids)] = ids[example.n_prompt:]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if states is not None:
        embeds = torch.zeros((len(examples), width, states[0].shape[-1]))  # (B, T, d)
        for row, state in enumerate(states):
            embeds[row, : len(state)] = state
        batch["inputs_embeds"] = embeds
    return {name: tensor.to(device) for name, tensor in batch.items()}


def response_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed token NLL of each row's response and (B,) its token count; position t predicts t+1.

    With inputs_embeds in the batch the decoder must be cut to the top layers (decoder_layers)."""
    source = "inputs_embeds" if "inputs_embeds" in batch else "input_ids"
    inputs = {source: batch[source]}
    hidden = model.get_decoder()(**inputs, attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state  # (B, T, d)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    scored = targets != IGNORE  # (B, T-1)
    logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()  # (N, V), N = response tokens
    token_nll = F.cross_entropy(logits, targets[scored], reduction="none")  # (N,)
    rows = scored.nonzero()[:, 0]  # (N,) batch row of each scored token
    per_row = torch.zeros(targets.shape[0], device=token_nll.device).index_add_(0, rows, token_nll)  # (B,)
    return per_row, scored.sum(dim=1)


def trunk_end(model, params) -> int | None:
    """Index of the first adapted layer where a frozen trunk exists (LoRA on the last N < L layers)."""
    n_layers = model.config.num_hidden_layers
    if params.mode != "lora" or params.lora_layers is None or params.lora_layers >= n_layers:
        return None
    return n_layers - params.lora_layers


@contextlib.contextmanager
def decoder_layers(model, start: int, stop: int | None = None, final_norm: bool = True):
    """Within the block the decoder runs layers[start:stop] only (and, if not final_norm, no final norm)."""
    decoder = model.get_decoder()
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


def with_adapters(model, params):
    """LoRA adapters (params.mode: lora) on the chosen layers, or every parameter trainable (full)."""
    if params.mode == "full":
        return model.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    layers = None if params.lora_layers is None else list(range(n_layers - params.lora_layers, n_layers))
    config = LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=0.0,
                        target_modules=list(params.lora_targets), layers_to_transform=layers, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate: linear warm-up over `warmup` steps, then decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress


def epoch_batches(examples: list[Example], params, epoch: int) -> list[list[int]]:
    """Length buckets of at most batch_tokens padded tokens, in an order seeded by (seed, epoch)."""
    batches = pack_batches([len(example.input_ids) for example in examples], params.batch_tokens)
    random.Random(f"{params.seed}-{epoch}").shuffle(batches)
    return batches


def train(model, examples: list[Example], params, pad_id: int, progress=None,
          states: list[torch.Tensor] | None = None) -> tuple[Any, dict]:
    """Fine-tune `model` on `examples`; (the model with adapters merged, a log of the run).

    `states`: the examples' frozen-trunk outputs (tasks/finetune/trunk.py); steps then run the top layers only."""
    device = str(next(model.parameters()).device)
    torch.manual_seed(params.seed)  # LoRA initialisation
    model = with_adapters(model, params)
    top = contextlib.nullcontext() if states is None else decoder_layers(model, trunk_end(model, params))
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
    schedule = [epoch_batches(examples, params, epoch) for epoch in range(params.epochs)]
    total = sum(len(batches) for batches in schedule)
    warmup = math.ceil(params.warmup_ratio * total)
    if progress is not None:
        progress.total = total  # known only now: the bar and the log lines can show how far along
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, params.schedule))
    model.train()
    losses: list[float] = []
    with top:
        for indices in itertools.chain.from_iterable(schedule):
            batch = collate([examples[i] for i in indices], pad_id, device,
                            None if states is None else [states[i] for i in indices])
            with autocast(device):
                nll, counts = response_nll(model, batch)
            loss = nll.sum() / counts.sum().clamp(min=1)  # token-weighted mean over the batch
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if progress is not None:
                progress.update(1)
    model.eval()
    if params.mode == "lora":
        model = model.merge_and_unload()  # plain weights again: generation runs at base-model speed
    return model, {"steps": total, "trainable_parameters": sum(p.numel() for p in trainable),
                   "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                   "losses": [round(value, 5) for value in losses]}
