"""Supervised fine-tuning of the base model on one subset: LoRA (peft) or all parameters.

An example is the model's chat template around the prompt turns and the assistant's response; the
loss is the mean token NLL of the response and its end-of-turn token only (the prompt is context,
as in METHOD.md 4). Batches are length-bucketed (similar lengths together, so little padding) and
visited in a seeded random order (finetune_eval.steps: a fixed number of steps, epochs cycling); AdamW with
linear warm-up, then cosine or linear decay; bf16 autocast on CUDA and (precision: auto) on a CPU with AMX
tiles, fp32 on other CPUs (bf16 matmuls measured slower there; resolve_precision).

`lora_layers: N` puts LoRA adapters on the last N decoder layers only. Autograd then records
nothing below them, so backward stops there; with the frozen-trunk cache (tasks/finetune/trunk.py) the
layers below are not even run again: a step costs the top N layers and the LM head. Logits are computed only at positions that predict a response token: the LM head (vocab x d) is
the single largest matmul of a small model, and prompt positions carry no loss.

Vision-language models (a model directory with a vision tower, tasks.curate.vlm.is_vlm_dir): the same
loop with the processor in place of the tokenizer. An example's prompt goes through the processor with
its images, so every image placeholder is expanded to the image's tokens (they count in batch_tokens
and carry no loss); the completion (response + end of turn) is tokenized as for text, so the loss is
on exactly the tokens the text path trains. Each batch's pixel inputs are made from its examples'
image files when the batch is built (tasks.curate.vlm.pixel_inputs, as extract does) and go to the
model's own multimodal forward: vision tower, projector, language model. LoRA goes on the language
model's decoder layers only (`lora_layers: N` = its last N); the vision tower and projector stay frozen.
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
from tasks.core.stage import ParamsError
from tasks.curate.images import image_paths
from tasks.curate.vlm import is_vlm_dir, load_images, pixel_inputs, template_messages

IGNORE = -100  # label of a position that has no loss (prompt, padding)


@dataclass(frozen=True, slots=True)
class Example:
    input_ids: tuple[int, ...]
    n_prompt: int  # leading tokens that are context only
    truncated: bool  # the prompt (or, if the response alone is too long, the response's end) was cut


@dataclass(frozen=True, slots=True)
class ImageExample(Example):
    """An Example of a vision-language model: input_ids hold the expanded image tokens."""

    prompt: str = ""  # the rendered prompt, as the processor reads it with the images (pixel_inputs)
    images: tuple[str, ...] = ()  # image files, in placeholder order


def resolve_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def resolve_precision(name: str | None, device: str) -> str:
    """fp32 or bf16 (autocast over fp32 master weights) for a device.

    None (callers without the setting): bf16 on CUDA, fp32 on a CPU. auto: bf16 also on a CPU with AMX tiles,
    where bf16 matmuls run in hardware: a LoRA forward + backward of SmolLM2-135M ran 10x faster than fp32 on
    a 2-core Xeon with AMX (docs/calibration.md); a CPU without AMX (AVX-512 bf16 only, or none) stays fp32,
    where bf16 measured slower (AMD EPYC)."""
    if name in ("fp32", "bf16"):
        return name
    if device.startswith("cuda"):
        return "bf16"
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()  # private in torch 2.13: may go
    return "bf16" if name == "auto" and has_amx else "fp32"


def evaluation_precision(precision: str | None, device: str) -> str | None:
    """The precision held-out evaluation runs in: training's on CUDA, fp32 on a CPU whatever training used, since
    generation under bf16 autocast re-casts every weight at every decoding step, slower there than fp32 (measured:
    the 100-problem generation did not finish in 8 min against 59 s in fp32)."""
    return precision if device.startswith("cuda") else "fp32"


def autocast(device: str, precision: str | None = None):
    """bf16 autocast where resolve_precision says so (fp32 master weights); nothing otherwise."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_model(model_dir: Path, device: str):
    """A causal LM, or (a directory with a vision tower) an image-text-to-text model; fp32, eval mode."""
    if is_vlm_dir(model_dir):
        from transformers import AutoModelForImageTextToText as auto_class
    else:
        auto_class = AutoModelForCausalLM
    model = auto_class.from_pretrained(model_dir, dtype=torch.float32).to(device)
    config = model.config.get_text_config()  # a causal LM's own config; a VLM's language model's
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise ValueError(f"{model_dir}: the model post-processes its logits (softcapping or scaling), which "
                         "response_nll does not reproduce; use a model without it")
    return model.eval()


def load_tokenizer(model_dir: Path):
    """The tokenizer of a text model; the processor (tokenizer and image processor) of a vision-language model."""
    from transformers import AutoProcessor, AutoTokenizer

    if is_vlm_dir(model_dir):  # backend="pil": as extract loads it (tasks/curate/vlm.py), the same pixels
        return AutoProcessor.from_pretrained(model_dir, backend="pil")
    return AutoTokenizer.from_pretrained(model_dir)


def processor_of(tokenizer):
    """The processor where `tokenizer` (load_tokenizer's) is one, else None: what makes a batch's pixels."""
    return tokenizer if hasattr(tokenizer, "image_processor") else None


def text_tokenizer(tokenizer):
    """The tokenizer itself, or a processor's tokenizer."""
    return tokenizer.tokenizer if processor_of(tokenizer) is not None else tokenizer


def is_vlm(model) -> bool:
    return hasattr(model.config, "vision_config")


def padding_id(tokenizer) -> int:
    """The padding token; end-of-sequence where the tokenizer has none (padding is masked anyway)."""
    tokenizer = text_tokenizer(tokenizer)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def render(tokenizer, prompt_messages: list[dict], response: str) -> tuple[str, str]:
    """(prompt text ready for generation, completion text = response + end of turn), templated.

    A processor renders with its own template, image parts as the {"type": "image"} it reads (template_messages)."""
    eos = text_tokenizer(tokenizer).eos_token or ""
    if processor_of(tokenizer) is not None:
        messages = template_messages(prompt_messages, response)  # prompt turns + the assistant's
        prompt_messages, response_turn = messages[:-1], messages[-1:]
    elif not getattr(tokenizer, "chat_template", None):
        return "\n".join(message["content"] for message in prompt_messages) + "\n", response + eos
    else:
        response_turn = [{"role": "assistant", "content": response}]
    prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_messages + response_turn, tokenize=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    # Templates that render a finished turn differently from a generation prompt (e.g. a thinking
    # block only in one of them): train on exactly what generation will continue from.
    return prompt, response + eos


def encode(tokenizer, prompt_messages: list[dict], response: str, max_seq_len: int) -> Example:
    """Token ids of prompt + completion; too long: the prompt loses its start first (as in extract)."""
    if processor_of(tokenizer) is not None:
        return encode_with_images(tokenizer, prompt_messages, response, max_seq_len)
    prompt, completion = render(tokenizer, prompt_messages, response)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    kept_completion = completion_ids[: max_seq_len - 1]  # at least one prompt token predicts the first
    kept_prompt = prompt_ids[max(0, len(prompt_ids) - (max_seq_len - len(kept_completion))):]
    truncated = len(kept_prompt) < len(prompt_ids) or len(kept_completion) < len(completion_ids)
    return Example(tuple(kept_prompt + kept_completion), len(kept_prompt), truncated)


def encode_with_images(processor, prompt_messages: list[dict], response: str, max_seq_len: int) -> ImageExample:
    """encode() through a processor: the prompt's image placeholders expanded, the completion as for text.

    Not tasks.curate.vlm.encode_multimodal: that maps step spans and ends at the response's last token
    (extract needs no end of turn); training needs the text path's prompt/completion split. Image
    tokens cannot be cut, so the prompt is kept whole: a completion too long loses its end, and a
    prompt that alone fills max_seq_len is refused."""
    prompt, completion = render(processor, prompt_messages, response)
    paths = tuple(image_paths(prompt_messages))
    prompt_ids = processor(text=[prompt], images=[load_images(paths)] if paths else None,
                           add_special_tokens=False)["input_ids"][0]  # (n_prompt,) with image tokens
    completion_ids = processor.tokenizer(completion, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_seq_len:
        raise ValueError(f"max_seq_len: {max_seq_len} positions, but a prompt with its {len(paths)} image(s) takes "
                         f"{len(prompt_ids)}; images cannot be truncated, raise max_seq_len")
    kept_completion = list(completion_ids[: max_seq_len - len(prompt_ids)])
    return ImageExample(tuple(int(i) for i in prompt_ids) + tuple(kept_completion), len(prompt_ids),
                        len(kept_completion) < len(completion_ids), prompt, paths)


def collate(examples: list[Example], pad_id: int, device: str,
            states: list[torch.Tensor] | None = None, processor=None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on prompt and padding), each (B, T);
    with trunk `states` (one (T_i, d) per example, tasks/finetune/trunk.py) also inputs_embeds (B, T, d);
    with a `processor`, the pixel inputs of the examples' images (ImageExample), made now."""
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
    if processor is not None:  # image tokens of row b are the b-th run of image tokens in the flattened ids
        batch.update(pixel_inputs(processor, [(example.prompt, example.images) for example in examples]))
    return {name: tensor.to(device) for name, tensor in batch.items()}


TEXT_BATCH = ("input_ids", "attention_mask", "labels", "inputs_embeds")  # the rest of a batch: pixel inputs


def final_hidden(model):
    """What computes the hidden state the LM head reads: the decoder, or a VLM's multimodal body (vision tower,
    projector, language model: transformers' base_model, as extract reads it; under peft, the wrapped model's)."""
    if not is_vlm(model):
        return model.get_decoder()
    return (model.get_base_model() if hasattr(model, "get_base_model") else model).base_model


def response_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed token NLL of each row's response and (B,) its token count; position t predicts t+1.

    With inputs_embeds in the batch the decoder must be cut to the top layers (decoder_layers);
    pixel inputs in the batch go to a VLM's forward with the ids."""
    source = "inputs_embeds" if "inputs_embeds" in batch else "input_ids"
    inputs = {source: batch[source]}
    pixels = {name: value for name, value in batch.items() if name not in TEXT_BATCH}
    hidden = final_hidden(model)(**inputs, **pixels, attention_mask=batch["attention_mask"],
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
    check_lora_targets(model, params)
    from peft import LoraConfig, get_peft_model

    if is_vlm(model):
        return get_peft_model(model, LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=0.0,
                                                target_modules=language_model_targets(model, params)))
    n_layers = model.config.num_hidden_layers
    layers = None if params.lora_layers is None else list(range(n_layers - params.lora_layers, n_layers))
    config = LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=0.0,
                        target_modules=list(params.lora_targets), layers_to_transform=layers, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def check_lora_targets(model, params) -> None:
    """Refuse lora_targets that name no module of the model (peft would fail deep inside, or a VLM's adapters
    would land nowhere): one line naming the setting and the model's own layer names."""
    names = {name.split(".")[-1] for name, module in model.named_modules()
             if name and not list(module.children())}  # leaf modules: the layers adapters can wrap
    missing = [target for target in params.lora_targets if target not in names]
    if missing:
        raise ParamsError(f"{params.section}.lora_targets: {missing} name no layer of the model; its layers are "
                          f"{sorted(names)}")


def language_model_targets(model, params) -> list[str]:
    """Full names of the lora_targets modules in the language model's last lora_layers decoder layers.

    By name, not peft's layers_to_transform: that matches every `layers.<i>` in the model, the vision
    tower's encoder layers included."""
    layers = model.get_decoder().layers
    chosen = range(len(layers)) if params.lora_layers is None else range(max(len(layers) - params.lora_layers, 0),
                                                                          len(layers))
    names = {id(module): name for name, module in model.named_modules()}
    return [f"{names[id(layers[index])]}.{name}" for index in chosen
            for name, module in layers[index].named_modules() if name.split(".")[-1] in params.lora_targets]


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


def training_schedule(examples: list[Example], params) -> list[list[list[int]]]:
    """The batches of each epoch; with params.steps (finetune_eval.steps), epochs reshuffled until exactly that many
    steps, so every subset of one budget gets the same number of updates whatever its token count."""
    steps = getattr(params, "steps", None)
    if not examples:
        raise ValueError("fine-tune: no examples to train on")
    if steps is None:
        return [epoch_batches(examples, params, epoch) for epoch in range(params.epochs)]
    schedule, taken = [], 0
    while taken < steps:
        batches = epoch_batches(examples, params, len(schedule))[: steps - taken]
        schedule.append(batches)
        taken += len(batches)
    return schedule


def train(model, examples: list[Example], params, pad_id: int, progress=None,
          states: list[torch.Tensor] | None = None, processor=None) -> tuple[Any, dict]:
    """Fine-tune `model` on `examples`; (the model with adapters merged, a log of the run).

    `states`: the examples' frozen-trunk outputs (tasks/finetune/trunk.py); steps then run the top layers only.
    `processor`: a VLM's (processor_of), which makes each batch's pixel inputs."""
    device = str(next(model.parameters()).device)
    torch.manual_seed(params.seed)  # LoRA initialisation
    model = with_adapters(model, params)
    top = contextlib.nullcontext() if states is None else decoder_layers(model, trunk_end(model, params))
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
    schedule = training_schedule(examples, params)
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
                            None if states is None else [states[i] for i in indices], processor)
            with autocast(device, getattr(params, "precision", None)):
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
