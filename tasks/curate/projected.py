"""The projected gradient source (extract.projected): exact per-span weight gradients, randomly projected.

For a linear layer y = W x (W: (d_out, d_in)) the gradient of span s's loss is
    G_s = sum_t delta_t^s x_t^T,   delta_t^s = dL_s / dy_t  (d_out),  x_t the layer input (d_in),
summed over every position t of the trace (a position feeds the losses of all later ones). It is
never formed. Each layer gets two seeded projections, P_in (d_in, k_in) and P_out (d_out, k_out),
with i.i.d. N(0, 1/k) (or +-1/sqrt(k) Rademacher) entries, and extract keeps
    G^_s = P_out^T G_s P_in = sum_t (P_out^T delta_t^s)(P_in^T x_t)^T     (k_out, k_in)
concatenated over layers, and the float64 Gram <G^_i, G^_j> of the K+1 spans (proxy_gram's shape).
E[P P^T] = I for each factor and the two are independent, so every Gram entry is unbiased:
E <P_o^T A P_i, P_o^T B P_i>_F = <A, B>_F. For rank-one layer gradients its variance is at most
v |A|_F^2 |B|_F^2 with v = (1 + 2/k_out)(1 + 2/k_in) - 1 (~4/k; each factor is a dense JL projection
of one vector pair; tests/tasks/curate/test_projected.py checks the bound on real, higher-rank gradients).
Layers' errors are independent, so a Gram entry's variance is at most v sum_l |A_l|^2 |B_l|^2: it
shrinks with the number of layers that carry the gradient. A factor whose size is at most k is kept
whole (exact, no larger); projection_dim null keeps every factor whole: the Grams are then exactly
those of the weight gradients (biases are left out: d_out numbers against d_out * d_in).

Why the Kronecker-factored form (LoGra, Choe et al. 2024) and not TRAK/LESS's dense projection of
the flattened gradient: a dense (P, k) Rademacher matrix for the P ~ 1e8 block weights of the 135M
default model is 1e8 * k numbers (0.4 GB per projected dimension), regenerated or streamed for every
span, and it needs the flat per-span gradient (0.4 GB each) before projecting. The factored form
needs only what the forward and backward passes already hold per layer, x (T, d_in) and delta
(T, d_out), plus two (d, k) matrices per layer; its cost is two thin matmuls per layer.

How delta arrives without its (K+1, T, d_out) tensors: each chosen layer's output gets a zero
"probe" z (T, k_out) added through y + z P_out^T, so dL_s/dz = delta^s P_out is the projected
upstream signal itself, and autograd returns only those thin tensors. The K+1 span losses come from
one forward: their gradient w.r.t. the final hidden states is r_t (the proxy's W^T delta_t, by
one backward through the head) on span s's positions and zero elsewhere, so one batched
vector-Jacobian product (torch.autograd.grad, is_grads_batched: the backward vmapped over the K+1
cotangents) runs every span's backward pass through the decoder at once. Where vmap does not cover
the model's ops, a loop of K+1 backward passes over the kept graph gives the same numbers (detected
once per model, logged). The model's weights never need gradients: the backward stops at the
lowest probed layer (projected_blocks: N runs it through the top N blocks only).

Targets: `linear`, every nn.Linear of the chosen decoder blocks (q, k, v, o, gate, up, down for
Llama); `full`, every parameter (METHOD.md's g_k, exact mode's `full`): those linears, the input
embedding (a layer whose input is onehot(token), so P_in^T x is a row of P_in), the LM head
(G_s = sum_{t in s} delta_t h_t^T from the head's own upstream signal, no backward; a tied matrix
is one matrix whose gradient sums both uses) and the norms' gains, kept whole (y = w * f(x), so
dL/dw = sum_t delta_t * f(x_t): d numbers per norm); a model with other parameters (biases) is
refused. On the default model the block linears carry ~55% of the full gradient's squared norm,
the tied embedding matrix ~15%, the 61 norm gains ~30%; `lora`, fresh LoRA adapters (peft, rank r, the exact-mode seed and init, tasks/diagnostics/exact.py) on
q/k/v/o as LESS (Xia et al., 2024) takes them: B = 0, so dL/dA = 0 and the signal is
dL/dB = sum_t delta_t (A x_t)^T, the lora_B layer's own weight gradient.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.core.stage import module_logger
from tasks.curate.proxy import ProxyModel, TraceNumbers, collate, fixed_threads, span_summaries
from tasks.curate.spans import EncodedTrace

log = module_logger(__name__)

PROJECTIONS = ("gaussian", "rademacher")
PROJECTED_TARGETS = ("linear", "full", "lora")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")  # LESS's gradient features


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The decoder blocks of a Llama-style causal LM, bottom first (projected targets, exact target last_blocks)."""
    blocks = getattr(model.base_model, "layers", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__}: no base_model.layers; blocks are read from "
                         "Llama-style decoders only (exact: use head or lora)")
    return blocks


@dataclass(frozen=True)
class ProjectedSpec:
    """Which layers the projected source differentiates and how it projects them (module docstring)."""

    target: str = "full"  # full | linear | lora
    blocks: int | None = None  # null = every decoder block; N = the top N
    dim: int | None = 32  # k_in = k_out per layer; null = no projection (exact Grams)
    projection: str = "gaussian"  # gaussian | rademacher
    seed: int = 0  # projections, and the LoRA adapters' A
    lora_r: int = 8  # lora: adapter rank

    def check(self) -> None:
        if self.target not in PROJECTED_TARGETS:
            raise ValueError(f"projected target {self.target!r}: choose one of {list(PROJECTED_TARGETS)}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection {self.projection!r}: choose one of {list(PROJECTIONS)}")
        for name in ("blocks", "dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"projected {name}={getattr(self, name)}: null or a positive integer")
        if self.lora_r < 1:
            raise ValueError(f"projected lora_r={self.lora_r}: must be >= 1")
        if self.target == "full" and self.blocks is not None:
            raise ValueError("projected target full is every parameter: blocks must be null (or use target linear)")


def projection_matrix(seed: int, layer: str, side: str, d: int, k: int | None, kind: str) -> torch.Tensor | None:
    """(d, k) float32 projection of one factor of one layer, or None (kept whole) where k is null or >= d.

    Drawn on the CPU from a generator seeded by sha256(seed, layer name, side): the same numbers on
    every device and run, and independent of which other layers are chosen.
    """
    if k is None or k >= d:
        return None
    digest = hashlib.sha256(f"{seed}\x00{layer}\x00{side}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    if kind == "gaussian":
        matrix = torch.randn(d, k, generator=generator)
    else:
        matrix = torch.randint(0, 2, (d, k), generator=generator).float().mul_(2).sub_(1)
    return matrix / math.sqrt(k)  # E[P P^T] = I: inner products unbiased


def factor_sizes(module: torch.nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a layer y = W x; an embedding is one with x = onehot(token) (V) and y its row (d)."""
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


def is_gain(module: torch.nn.Module) -> bool:
    """A norm-like module whose one parameter is a (d,) gain: y = w * f(x) (checked at load)."""
    own = dict(module.named_parameters(recurse=False))
    return (not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and list(own) == ["weight"]
            and own["weight"].dim() == 1)


def check_gain(name: str, module: torch.nn.Module) -> None:
    """Refuse a gain module whose output is not linear in its weight: G = sum_t delta_t * f(x_t) would be wrong."""
    weight = module.weight
    x = torch.randn(1, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        once, twice = (torch.func.functional_call(module, {"weight": w}, (x,)) for w in (weight, 2 * weight))
    if not torch.allclose(twice, 2 * once, rtol=1e-5, atol=1e-6):
        raise ValueError(f"projected target full: {name} ({type(module).__name__}) is not y = weight * f(x) "
                         "(e.g. Gemma's (1 + weight)); use target linear")


def chosen_layers(model, spec: ProjectedSpec) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every layer in the decoder the spec differentiates, bottom first (the embedding).

    linear and lora: the nn.Linear (lora_B) layers of the chosen blocks. full: the input embedding,
    every linear and gain (norm) of every block, and the final norm; the LM head is handled apart.
    """
    names = {id(module): name for name, module in model.named_modules()}
    blocks = list(decoder_blocks(model))
    layers = []
    if spec.target == "full":
        embedding = model.get_input_embeddings()
        if type(embedding) is not torch.nn.Embedding:  # e.g. Gemma scales its output: the hook would miss it
            raise ValueError(f"projected target full: {type(embedding).__name__} is not a plain nn.Embedding")
        layers.append((names[id(embedding)], embedding))
    for block in blocks[-spec.blocks:] if spec.blocks else blocks:
        for _, module in block.named_modules():
            name = names[id(module)]
            if isinstance(module, torch.nn.Linear) and (
                    (".lora_B." in name) if spec.target == "lora" else (".lora_" not in name)):
                layers.append((name, module))
            elif spec.target == "full" and is_gain(module):
                layers.append((name, module))
    if spec.target == "full":
        final_norm = getattr(model.base_model, "norm", None)
        if final_norm is not None and is_gain(final_norm):
            layers.append((names[id(final_norm)], final_norm))
        covered = {id(p) for _, m in layers for p in m.parameters(recurse=False)}
        covered.add(id(model.get_output_embeddings().weight))
        missing = [n for n, p in model.named_parameters() if id(p) not in covered]
        if missing:  # biases, positional tables, ...: full would not be every parameter
            raise ValueError(f"projected target full covers linears, embeddings and gains; the model also has "
                             f"{missing[:3]}; use target linear")
    if not layers:
        raise ValueError(f"projected target {spec.target}: no linear layer found in the model's decoder blocks")
    return layers


class _Capture:
    """One forward pass's projected layer inputs and output probes, in the order the layers ran."""

    def __init__(self) -> None:
        self.layers: list[int] = []  # index into ProjectedModel.layers of each call, in execution order
        self.inputs: list[torch.Tensor] = []  # (1, T, k_in) fp32, P_in^T x per position
        self.probes: list[torch.Tensor] = []  # (1, T, k_out) zeros whose gradient is delta P_out


class _Computed:
    """A batch computed synchronously (the backward passes need the results): collect() just returns them."""

    def __init__(self, numbers: list[TraceNumbers]) -> None:
        self.numbers = numbers

    def collect(self) -> list[TraceNumbers]:
        return self.numbers


class ProjectedModel(ProxyModel):
    """ProxyModel that also returns each trace's projected span-gradient Gram (TraceNumbers.projected_gram)."""

    def __init__(self, model_dir: Path, device: str, spec: ProjectedSpec) -> None:
        super().__init__(model_dir, device)
        spec.check()
        self.spec = spec
        if spec.target == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            torch.manual_seed(spec.seed)  # as tasks/diagnostics/exact.py: the same adapters for the same seed
            config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_r, lora_dropout=0.0,
                                target_modules=list(LORA_MODULES))
            inject_adapter_in_model(config, self.model)  # B = 0: the model's outputs are unchanged
            self.model.to(device).requires_grad_(False)  # gradients flow to the probes only
        self.layers = chosen_layers(self.model, spec)
        for name, module in self.layers:
            if is_gain(module):
                check_gain(name, module)
        # (P_in, P_out) per layer; a gain's gradient (d numbers) is kept whole
        self.projections = [(None, None) if is_gain(m) else self._projections(name, m) for name, m in self.layers]
        sizes = [self._kept(m, pair) for (_, m), pair in zip(self.layers, self.projections)]  # (k_in, k_out)
        self.full = spec.target == "full"
        self.tied = self.full and self.head.weight is self.model.get_input_embeddings().weight
        if self.full:
            self.head_projections = self._projections("lm_head", self.head)
            if self.tied:  # one matrix: the embedding's (V-side, d-side) factors are the head's, swapped
                self.projections[0] = self.head_projections[::-1]
            else:
                sizes.append(sizes[0][::-1])  # the head's factors mirror the embedding's (d in, V out)
        self.dimension = sum(k_in * k_out for k_in, k_out in sizes)
        self.batched: bool | None = None  # batched VJP works for this model: None until first tried
        self._capture: _Capture | None = None
        self.gains = [is_gain(m) for _, m in self.layers]
        for index, (_, module) in enumerate(self.layers):
            module.register_forward_hook(self._hook(index))

    @staticmethod
    def _kept(module: torch.nn.Module, projections) -> tuple[int, int]:
        """(k_in, k_out): the sizes a layer's projected gradient keeps (a gain: (1, d))."""
        if is_gain(module):
            return 1, module.weight.shape[0]
        (d_in, d_out), (p_in, p_out) = factor_sizes(module), projections
        return d_in if p_in is None else p_in.shape[1], d_out if p_out is None else p_out.shape[1]

    def _projections(self, name: str, module: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        d_in, d_out = factor_sizes(module)
        return tuple(None if p is None else p.to(self.device) for p in (
            projection_matrix(self.spec.seed, name, "in", d_in, self.spec.dim, self.spec.projection),
            projection_matrix(self.spec.seed, name, "out", d_out, self.spec.dim, self.spec.projection)))

    def _hook(self, index: int):
        p_in, p_out = self.projections[index]

        def hook(module, inputs, output):
            capture = self._capture
            if capture is None:
                return None  # a plain forward (the logits probe at load): no probe
            if self.gains[index]:  # y = w * f(x): dL/dw = sum_t delta_t * f(x_t), f(x) = the output at w = 1
                self._capture = None  # the module runs again, its hook (this one) must not probe it
                try:
                    x = torch.func.functional_call(module, {"weight": torch.ones_like(module.weight)}, inputs)
                finally:
                    self._capture = capture
                x = x.detach().float()  # (1, T, d)
            elif isinstance(module, torch.nn.Embedding):  # x = onehot(token): P_in^T x is P_in's row
                ids = inputs[0]  # (1, T)
                x = F.one_hot(ids, module.num_embeddings).float() if p_in is None else p_in[ids]  # (1, T, k_in)
            else:
                x = inputs[0].detach().float()  # (1, T, d_in)
                if p_in is not None:  # in fp32 as on a CPU: under CUDA's autocast the product would be bf16
                    with torch.autocast(x.device.type, enabled=False):
                        x = x @ p_in  # (1, T, k_in)
            capture.layers.append(index)
            capture.inputs.append(x)
            width = output.shape[-1] if p_out is None else p_out.shape[1]
            probe = output.new_zeros((*output.shape[:-1], width)).requires_grad_(True)  # (1, T, k_out)
            capture.probes.append(probe)
            return output + (probe if p_out is None else probe @ p_out.T)  # unchanged values; d/dprobe = delta P_out

        return hook

    def _vjp(self, output: torch.Tensor, cotangents: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """d<cotangents[s], output>/d inputs for every s: (S, *input.shape) each, one batched backward if possible."""
        if self.batched is not False:
            try:
                grads = torch.autograd.grad(output, inputs, cotangents, retain_graph=True, is_grads_batched=True)
                self.batched = True
                return list(grads)
            except RuntimeError as error:
                if self.batched:
                    raise
                self.batched = False
                log.warning("projected: batched vector-Jacobian products unsupported for %s (%s); one backward "
                            "pass per span instead", type(self.model).__name__, str(error).splitlines()[0])
        per_span = [torch.autograd.grad(output, inputs, cotangent, retain_graph=True) for cotangent in cotangents]
        return [torch.stack(grads) for grads in zip(*per_span)]

    def trace_numbers(self, trace: EncodedTrace, head_variant: bool) -> TraceNumbers:
        """One trace: one forward with probes, proxy summaries, one batched backward for its K+1 spans."""
        batch = {name: tensor.to(self.device) for name, tensor in collate([trace], self.pad_id, pin=False).items()}
        self.forward_calls += 1
        capture = self._capture = _Capture()
        try:
            with self._autocast():
                hidden = self.decoder(input_ids=batch["input_ids"], use_cache=False).last_hidden_state  # (1, T, d)
        finally:
            self._capture = None
        positions = batch["flat_positions"]  # (N,) loss positions (batch of one: flat = position)
        h = hidden.flatten(0, 1)[positions].detach().requires_grad_(True)  # (N, d)
        with self._autocast():
            logits = self.head(h)  # (N, V)
        with torch.no_grad():
            summaries = span_summaries(h.detach().float(), logits.detach(), batch["targets"], batch, self.head_weight,
                                       softcap=self.softcap, head_dtype=self.head_dtype if head_variant else None)
        capped = logits.float() if self.softcap is None else self.softcap * torch.tanh(logits.float() / self.softcap)
        # a token's loss depends on its own h_t only, so one backward of their sum gives every r_t = dl_t/dh_t
        # and every upstream signal delta_t = dl_t/dlogits_t (the LM head's own gradient, span by span)
        r, upstream = torch.autograd.grad(F.cross_entropy(capped, batch["targets"], reduction="sum"), (h, logits))
        labels = torch.as_tensor(trace.loss_span[trace.loss_span >= 0], device=self.device).long()  # (N,) span of each
        cotangents = hidden.new_zeros((trace.n_spans, *hidden.shape))  # (S, 1, T, d): dL_s/dh, r_t on span s only
        cotangents[labels, 0, positions] = r.to(cotangents.dtype)
        grads = self._vjp(hidden, cotangents, capture.probes)  # (S, 1, T, k_out) per layer: P_out^T delta^s
        blocks: dict[int, torch.Tensor] = {}  # layer -> its projected span gradients, summed over its calls
        for index, g, x in zip(capture.layers, grads, capture.inputs):
            block = (torch.einsum("sbtd,btd->sd", g.float(), x) if self.gains[index]  # (S, d) per gain
                     else torch.einsum("sbto,bti->soi", g.float(), x))  # (S, k_out, k_in) per matrix
            blocks[index] = blocks[index] + block if index in blocks else block
        blocks = [blocks[index] for index in sorted(blocks)]
        if self.full:  # layer 0 is the input embedding
            blocks += self._head_blocks(blocks.pop(0), h, upstream, labels, trace.n_spans)
        vectors = torch.cat([block.flatten(1) for block in blocks], dim=1).double()  # (S, D)
        gram = (vectors @ vectors.T).cpu().numpy()  # (S, S) float64
        with torch.no_grad():  # the question's mean state, as ProxyModel.launch computes it
            prompt_embedding = torch.einsum("bt,btd->bd", batch["question_weights"], hidden.float())[0]  # (d,)
        return TraceNumbers(summaries.span_loss[0].cpu().numpy(), summaries.proxy_gram[0].cpu().numpy(),
                            None if summaries.head_gram is None else summaries.head_gram[0].cpu().numpy(),
                            prompt_embedding.cpu().numpy(), projected_gram=gram)

    def _head_blocks(self, embedding: torch.Tensor, h: torch.Tensor, upstream: torch.Tensor, labels: torch.Tensor,
                     n_spans: int) -> list[torch.Tensor]:
        """The LM head's projected span gradients, merged with the embedding's where the matrix is tied.

        Head W (V, d): G_s = sum_{t in s} delta_t h_t^T, no backward needed. A tied matrix's gradient
        is G_head + G_embedding^T, and its embedding factors are the head's swapped, so the
        embedding's (S, k_d, k_V) block transposed adds to the head's (S, k_V, k_d) one.
        """
        p_in, p_out = self.head_projections
        x = h.detach().float() if p_in is None else h.detach().float() @ p_in  # (N, k_d)
        delta = upstream.float() if p_out is None else upstream.float() @ p_out  # (N, k_V)
        spans = F.one_hot(labels, n_spans).T.float()  # (S, N)
        head = torch.einsum("sn,no,ni->soi", spans, delta, x)  # (S, k_V, k_d)
        return [head + embedding.transpose(1, 2)] if self.tied else [embedding, head]

    def launch(self, traces: list[EncodedTrace], head_variant: bool) -> _Computed:
        """Every trace of the batch on its own: one trace's K+1 backward passes would otherwise run over all B rows."""
        with fixed_threads(self.device):  # the same bytes whatever the process's thread count, as the proxy's
            return _Computed([self.trace_numbers(trace, head_variant) for trace in traces])
