"""Exact mode (METHOD.md 3, "exact"): true per-span gradients by autograd, to check the proxy.

For checking, not production: per trace one forward pass, then one backward pass per span
(torch.autograd.grad on the chosen parameters only, the graph kept between spans). The spans and
tokens are those of tasks.curate.spans, so exact mode sees what extract saw; the output is the same
(K+1, K+1) Gram of span gradients (steps..., answer) as EXTRACT_SCHEMA's proxy_gram, so
tasks.curate.score.step_signals turns it into alpha, consistency and step scores unchanged.

Targets, i.e. the parameters whose gradient g_k is taken:
  head         the LM-head matrix W (V, d) in its output-projection use: logits = h W^T with h the
               final hidden states held fixed. For untied embeddings this is exactly the gradient
               of the lm_head weight; for tied embeddings (SmolLM2) the parameter's full gradient
               would add its input-embedding use, which the "head" variant (extract's head_gram)
               does not model, so that use is left out here too. A head bias, if any, enters the
               logits but is not differentiated.
  last_blocks  every parameter of the last N decoder blocks plus the final norm (the norm sits
               between those blocks and the head, so it belongs to the same top of the network);
               the head itself is the separate target above. Backward runs through those blocks only.
  full         every parameter of the model: g_k = grad_theta of METHOD.md 1 itself, the gradient
               the proxy stands in for (tied embeddings: both uses of the shared matrix). One full
               backward pass per span and a (K+1, P) float32 host buffer (0.54 GB per span for the
               135M default model), so: a few traces, small models.
  lora         fresh LoRA adapters (peft, rank r, no dropout) on the given projections of every
               block; default q/k/v/o, the projections LESS (Xia et al., 2024) takes gradient
               features from. Standard init sets B = 0, so the model is unchanged and dL/dA = 0:
               the meaningful gradient is dL/dB = (dL/d out)(A x)^T. Both A and B gradients enter
               the vector; A's are zero and add nothing. lora_alpha = r (scale 1); cosines do not
               depend on a common scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.curate.projected import decoder_blocks
from tasks.curate.spans import EncodedTrace

TARGETS = ("head", "last_blocks", "lora", "full")
GRAM_CHUNK = 1 << 22  # parameters per float64 Gram chunk: bounds the temporary copy to (K+1) x 32 MiB


@dataclass(frozen=True)
class ExactSpec:
    """Which parameters exact mode differentiates (module docstring)."""

    target: str = "head"
    last_n_blocks: int = 2  # last_blocks: how many decoder blocks from the top
    lora_r: int = 8  # lora: adapter rank
    lora_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # lora: projections adapted
    seed: int = 0  # lora: seed of the adapters' random A

    def check(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"exact target {self.target!r}: choose one of {list(TARGETS)}")
        if self.last_n_blocks < 1 or self.lora_r < 1:
            raise ValueError(f"exact: last_n_blocks={self.last_n_blocks} and lora_r={self.lora_r} must be >= 1")


@dataclass(frozen=True, slots=True)
class ExactNumbers:
    """One trace's exact results, spans in extract order."""

    span_loss_sums: np.ndarray  # (K+1,) float64
    gram: np.ndarray  # (K+1, K+1) float64 <g_i, g_j>


def gram_float64(vectors: torch.Tensor) -> np.ndarray:
    """V V^T in float64 for (k, P) float32 vectors, converting P in chunks to bound memory."""
    gram = torch.zeros(vectors.shape[0], vectors.shape[0], dtype=torch.float64)
    for start in range(0, vectors.shape[1], GRAM_CHUNK):
        chunk = vectors[:, start:start + GRAM_CHUNK].double()  # (k, chunk)
        gram += chunk @ chunk.T
    return gram.numpy()


class ExactModel:
    """A causal LM set up to return per-span gradient Grams of one exact target."""

    def __init__(self, model_dir: Path, spec: ExactSpec, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec.check()
        torch.manual_seed(spec.seed)
        self.spec, self.device = spec, device
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        if spec.target == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_r, lora_dropout=0.0,
                                target_modules=list(spec.lora_modules))
            inject_adapter_in_model(config, self.model)  # in place: base_model's forward now runs the adapters
        self.model.to(device)
        self.decoder, self.head = self.model.base_model, self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.head_weight = self.head.weight.detach()  # (V, d) shares storage; a leaf of its own
        if spec.target == "head":
            self.params = [self.head_weight.requires_grad_(True)]
        elif spec.target == "last_blocks":
            top = list(decoder_blocks(self.model))[-spec.last_n_blocks:]
            self.params = [p for block in top for p in block.parameters()] + list(self.decoder.norm.parameters())
        elif spec.target == "full":
            self.params = list(self.model.parameters())  # a tied matrix once: parameters() skips repeats
        else:
            self.params = [p for name, p in self.model.named_parameters() if "lora_" in name]
            if not self.params:
                raise ValueError(f"lora_modules {list(spec.lora_modules)} matched no module of the model")
        for param in self.params:
            param.requires_grad_(True)
        self.n_parameters = sum(p.numel() for p in self.params)

    def span_losses(self, trace: EncodedTrace) -> torch.Tensor:
        """(K+1,) sum of token NLL per span, differentiable w.r.t. the target parameters.

        Each span gets its own head product from its own positions, so span k's backward runs the
        (V, d) head for its n_k positions only, not for all n loss positions of the trace.
        """
        ids = torch.as_tensor(trace.input_ids, device=self.device).unsqueeze(0)  # (1, T)
        positions = np.flatnonzero(trace.loss_span >= 0)  # (n,)
        if self.spec.target == "head":
            with torch.no_grad():  # h is held fixed: only the head's use of W is differentiated
                hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state[0]  # (T, d)
            weight = self.head_weight
        else:
            hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state[0]  # (T, d)
            weight = self.head.weight
        losses = []
        for k in range(trace.n_spans):
            span_positions = torch.as_tensor(positions[trace.loss_span[positions] == k], device=self.device)  # (n_k,)
            logits = F.linear(hidden[span_positions], weight, self.head.bias)  # (n_k, V)
            if self.softcap is not None:
                logits = self.softcap * torch.tanh(logits / self.softcap)
            losses.append(F.cross_entropy(logits.float(), ids[0, span_positions + 1], reduction="sum"))
        return torch.stack(losses)

    def grams(self, trace: EncodedTrace) -> ExactNumbers:
        """Per-span gradients by one backward each, flattened, and their float64 Gram."""
        losses = self.span_losses(trace)  # (K+1,)
        vectors = torch.empty(trace.n_spans, self.n_parameters)  # (K+1, P) float32 on the host
        for k in range(trace.n_spans):
            grads = torch.autograd.grad(losses[k], self.params, retain_graph=k + 1 < trace.n_spans,
                                        allow_unused=True)
            vectors[k] = torch.cat([torch.zeros(p.numel()) if g is None else g.detach().reshape(-1).cpu()
                                    for p, g in zip(self.params, grads)])
        return ExactNumbers(losses.detach().double().cpu().numpy(), gram_float64(vectors))
