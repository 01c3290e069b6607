"""The gradient proxy of METHOD.md 3: per-span loss, proxy Gram and LM-head Gram from one forward pass.

For a loss position t with final hidden state h_t, LM head W (V, d), p_t = softmax(W h_t) and target
y_t, the upstream signal is delta_t = p_t - onehot(y_t) and the representation-level gradient is
r_t = W^T delta_t. Only span sums are ever needed, so the (tokens, V) @ (V, d) product per token
is never formed: g~_k = (sum_{t in k} delta_t) @ W is one (spans, V) @ (V, d) product. Only loss
positions reach the LM head (a bare forward computes logits at every position), which pays for
the softmax passes; the "head" variant adds an (n, V) @ (V, n) product per trace of n loss tokens.

Long traces (chunked_span_sums): without the head variant, logits exist for at most LOGIT_CHUNK loss
positions at a time, so memory is bounded by chunk x V, not n x V, whatever the response length; a
span cut by a chunk boundary is summed over its pieces. The head variant needs every (t, u) pair of
a trace, (n, n) and (n, V) at once: quadratic in the response length, so it is off by default.

delta_t is handled as q_t - a_t onehot(y_t): q_t is p_t with its target entry zeroed and a_t = sum(q_t)
= 1 - p_t[y_t] is the mass of the other tokens, so a confident token (p_t[y_t] -> 1, beyond fp32
resolution near 1) keeps its small but exact delta instead of a rounded p_t[y_t] - 1. p stays fp32;
only the (n, V) @ (V, n) product of the "head" variant runs in bf16 on a GPU (entries >= 0, so no
cancellation inside it). On CPU everything runs in fp32.

Models with a final logit soft-cap (Gemma 2/3: logits = c tanh(z / c)) are handled through the cap's
derivative; any other way of turning hidden states into logits is refused at load by a probe that
compares the model's own logits with head(h).

On CPU every batch runs on COMPUTE_THREADS (1) torch thread, in process, in a Dask worker and in a
DVC subprocess alike: how MKL and ATen split a product or a reduction over threads moves its float
rounding (on AVX2 machines 1 and 2 threads give different bytes), so a count that followed the
machine's cores or load would make shards differ between runs. Parallelism on CPU comes from
extract.workers (one single-threaded process per core) instead.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.core.stage import ParamsError
from tasks.curate.spans import EncodedTrace, SpanError, encode_traces


# Loss positions whose logits exist at once (chunked_span_sums): memory ~ 2 x chunk x V x 4 B
# (logits and q), 0.8 GB at V = 49k; larger chunks only save kernel launches.
LOGIT_CHUNK = 2048

COMPUTE_THREADS = 1  # torch intra-op threads of every CPU batch: a fixed count gives the same bytes everywhere


@contextlib.contextmanager
def fixed_threads(device: str):
    """Run the block on COMPUTE_THREADS torch threads on CPU (restored after); CUDA kernels do not depend on it."""
    if device.startswith("cuda"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(COMPUTE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str) -> str:
    """params.device -> a torch device string; auto = cuda when present, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"extract.device: {name!r} but torch sees no CUDA device; use auto or cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ParamsError(f"extract.device: {name!r} is not auto, cpu, cuda or cuda:N")
    return name


def precision(device: str) -> str:
    """The numerics a device gives (part of the cache key): bf16 autocast on CUDA, fp32 on CPU."""
    return "bf16-autocast" if device.startswith("cuda") else "fp32"


def model_identity(model_dir: Path) -> str:
    info = Path(model_dir) / "model_info.json"
    if not info.is_file():
        raise FileNotFoundError(f"{info} is missing: extract reads the directory the model stage writes")
    return json.loads(info.read_text(encoding="utf-8"))["identity"]


def loss_layout(span_labels: list[np.ndarray], chunk: int = LOGIT_CHUNK) -> dict[str, np.ndarray]:
    """Indices between the flat loss slots of a batch and per-trace padded layouts (host side).

    span_labels[b] (n_b,) is the span of each loss slot of trace b, in position order, so every span
    is a contiguous run of the flat slots (trace-major). V-sized work runs on the flat slots, with
    no padding; only the (spans, spans) and (slots, slots) Grams need per-trace padding. Pieces are
    the spans cut at every multiple of `chunk` slots: chunk c holds pieces chunk_pieces[c:c+2].
    """
    batch = len(span_labels)
    slots = max(len(labels) for labels in span_labels)  # n
    spans = max(int(labels.max()) + 1 for labels in span_labels)  # k
    offsets = np.cumsum([0] + [len(labels) for labels in span_labels])
    slot_row = np.zeros((batch, slots), dtype=np.int64)  # (B, n) flat slot of each padded slot; padding -> 0
    span_onehot = np.zeros((batch, spans, slots), dtype=np.float32)  # (B, k, n)
    for b, labels in enumerate(span_labels):
        slot_row[b, :len(labels)] = offsets[b] + np.arange(len(labels))
        span_onehot[b, labels, np.arange(len(labels))] = 1.0
    counts = [np.bincount(labels) for labels in span_labels]
    span_ends = np.cumsum(np.concatenate(counts))  # (S,) flat slot after each span
    total = int(span_ends[-1])
    cuts = np.union1d(span_ends, np.arange(chunk, total, chunk))  # (P,) end of each piece
    piece_starts = np.concatenate([[0], cuts[:-1]])
    return {
        "piece_lengths": (cuts - piece_starts).astype(np.int64),  # (P,) slots per piece
        "piece_span": np.searchsorted(span_ends, piece_starts, side="right"),  # (P,) flat span of each piece
        # (C+1,) first piece of each chunk, then P: every chunk start is a piece start
        "chunk_pieces": np.searchsorted(piece_starts, np.append(np.arange(0, total, chunk), total)),
        "span_lengths": np.concatenate(counts).astype(np.int64),  # (S,) slots per span, flat order
        "span_slot": np.concatenate([b * spans + np.arange(len(c)) for b, c in enumerate(counts)]),  # (S,) in B*k
        "slot_pad": np.concatenate([b * slots + np.arange(len(l)) for b, l in enumerate(span_labels)]),  # (N,) in B*n
        "slot_row": slot_row,
        "span_onehot": span_onehot,
    }


@dataclass(frozen=True, slots=True)
class SpanSummaries:
    span_loss: torch.Tensor  # (B, k) float64: sum of token NLL per span
    proxy: torch.Tensor  # (S, d) float32: g~ of every span of the batch, flat order
    proxy_gram: torch.Tensor  # (B, k, k) float64
    head_gram: torch.Tensor | None  # (B, k, k) float64: <G_i, G_j>_F of the LM-head gradients


def _padded(flat: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...], dtype=None) -> torch.Tensor:
    """Scatter flat rows into a zero-padded (B, m, ...) tensor; index holds each row's place in B*m."""
    out = flat.new_zeros((shape[0] * shape[1], *flat.shape[1:]), dtype=dtype or flat.dtype)
    return out.index_copy_(0, index, flat.to(out.dtype)).view(*shape, *flat.shape[1:])


def _token_deltas(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nll (N,), q (N, V), a (N,)) of N loss slots: delta_t = q_t - a_t onehot(y_t), through the soft-cap."""
    if softcap is None:
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (N, V)
    else:
        capped = softcap * torch.tanh(logits.float() / softcap)  # (N, V)
        slope = 1.0 - (capped / softcap) ** 2  # d capped / d logits
        logp = torch.log_softmax(capped, dim=-1)
    logp_y = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    q = logp.exp_()  # (N, V) p, in place: the log-probabilities are not needed any more
    q.scatter_(-1, targets.unsqueeze(-1), 0.0)  # delta_t = q_t - a_t onehot(y_t)
    a = q.sum(-1)  # (N,) 1 - p[y] as the mass of the other tokens: exact however close p[y] is to 1
    nll = torch.where(a < 0.5, -torch.log1p(-a), -logp_y)  # (N,) the confident tokens' loss from a as well
    if softcap is not None:  # dl/dlogits = delta * slope
        a = a * slope.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        q.mul_(slope)
    return nll, q, a


def _run_sums(nll, q, a, targets, lengths, head_weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (R,) f64, g~ (R, d)) summed over R contiguous runs of slots of the given lengths."""
    # segment sums are sequential per segment: deterministic on CUDA, unlike atomic index_add_
    loss = torch.segment_reduce(nll.double(), "sum", lengths=lengths, unsafe=True)  # (R,)
    # g~_k = (sum_{t in k} q_t) @ W - sum_{t in k} a_t W[y_t]
    proxy = (torch.segment_reduce(q, "sum", lengths=lengths, unsafe=True) @ head_weight
             - torch.segment_reduce(a.unsqueeze(-1) * head_weight[targets], "sum", lengths=lengths, unsafe=True))
    return loss, proxy


def chunked_span_sums(hidden: torch.Tensor, targets: torch.Tensor, layout: dict[str, torch.Tensor], head,
                      head_weight: torch.Tensor, chunk_pieces: list[int], *, softcap: float | None = None,
                      chunk: int = LOGIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(span loss (S,) f64, g~ (S, d)) with logits = head(hidden) for at most `chunk` loss slots at a time.

    hidden (N, d) as the decoder gave it, chunk_pieces the host copy of layout["chunk_pieces"] (loss_layout
    with the same chunk). Pieces of one chunk are distinct spans, so each chunk adds into its spans' rows
    with a plain indexed add, no atomics: the same numbers as the unchunked sums up to summation order.
    """
    n_spans = len(layout["span_lengths"])
    span_loss = hidden.new_zeros(n_spans, dtype=torch.float64)  # (S,)
    proxy = head_weight.new_zeros(n_spans, head_weight.shape[1])  # (S, d)
    for c, start in enumerate(range(0, len(targets), chunk)):
        pieces = slice(chunk_pieces[c], chunk_pieces[c + 1])
        y = targets[start:start + chunk]  # (C,)
        nll, q, a = _token_deltas(head(hidden[start:start + chunk]), y, softcap)  # (C,), (C, V), (C,)
        loss, g = _run_sums(nll, q, a, y, layout["piece_lengths"][pieces], head_weight)  # (P_c,), (P_c, d)
        rows = layout["piece_span"][pieces]  # (P_c,) distinct
        span_loss[rows] += loss
        proxy[rows] += g
    return span_loss, proxy


def _summaries(span_loss: torch.Tensor, proxy: torch.Tensor, layout: dict[str, torch.Tensor],
               head_gram: torch.Tensor | None = None) -> SpanSummaries:
    batch, spans, _ = layout["span_onehot"].shape
    proxy_pad = _padded(proxy, layout["span_slot"], (batch, spans), torch.float64)  # (B, k, d)
    proxy_gram = torch.bmm(proxy_pad, proxy_pad.transpose(1, 2))  # (B, k, k)
    return SpanSummaries(_padded(span_loss, layout["span_slot"], (batch, spans)), proxy, proxy_gram, head_gram)


def span_summaries(h: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, layout: dict[str, torch.Tensor],
                   head_weight: torch.Tensor, *, softcap: float | None = None,
                   head_dtype: torch.dtype | None = None) -> SpanSummaries:
    """Per-span loss, proxy and Grams from the N flat loss slots of a batch (layout: loss_layout on device).

    h (N, d) fp32 hidden states, logits (N, V) raw head outputs, targets (N,), head_weight (V, d) fp32;
    head_dtype None skips the head Gram.
    """
    batch, spans, slots = layout["span_onehot"].shape
    nll, q, a = _token_deltas(logits, targets, softcap)  # (N,), (N, V), (N,)
    span_loss, proxy = _run_sums(nll, q, a, targets, layout["span_lengths"], head_weight)  # (S,), (S, d)
    head_gram = None
    if head_dtype is not None:
        q_pad = _padded(q, layout["slot_pad"], (batch, slots), head_dtype)  # (B, n, V)
        h_pad = _padded(h, layout["slot_pad"], (batch, slots))  # (B, n, d)
        rows, y_pad = layout["slot_row"], targets[layout["slot_row"]]  # (B, n)
        a_pad = a[rows]
        # delta_t . delta_u = q_t.q_u - a_u q_t[y_u] - a_t q_u[y_t] + a_t a_u [y_t == y_u]
        cross = q[rows.unsqueeze(2), y_pad.unsqueeze(1)]  # (B, n, n) [t, u] = q_t[y_u], fp32
        delta_dot = (torch.bmm(q_pad, q_pad.transpose(1, 2)).float()  # (B, n, n)
                     - cross * a_pad.unsqueeze(1) - cross.transpose(1, 2) * a_pad.unsqueeze(2)
                     + (a_pad.unsqueeze(2) * a_pad.unsqueeze(1)) * (y_pad.unsqueeze(2) == y_pad.unsqueeze(1)))
        pair = (delta_dot * torch.bmm(h_pad, h_pad.transpose(1, 2))).double()  # (B, n, n) (delta.delta)(h.h)
        onehot = layout["span_onehot"].double()  # (B, k, n); zero on padded slots
        head_gram = torch.bmm(torch.bmm(onehot, pair), onehot.transpose(1, 2))  # (B, k, k)
    return _summaries(span_loss, proxy, layout, head_gram)


@dataclass(frozen=True, slots=True)
class TraceNumbers:
    """One trace's numbers, host side, spans in extract order."""

    span_loss_sums: np.ndarray  # (k,) float64
    proxy_gram: np.ndarray  # (k, k) float64
    head_gram: np.ndarray | None  # (k, k) float64
    prompt_embedding: np.ndarray  # (d,) float32 mean final hidden state over the question's tokens
    projected_gram: np.ndarray | None = None  # (k, k) float64: tasks/curate/projected.py, extract.projected only


def collate(traces: list[EncodedTrace], pad_id: int, pin: bool) -> dict[str, torch.Tensor]:
    """Right-padded inputs, flat loss slots and their layout for a batch, built on the host (pinned for CUDA).

    No attention mask: padding sits after every real token, so under causal attention no real
    position ever attends to it, and padded positions are never read (launch).
    """
    loss_positions = [np.flatnonzero(trace.loss_span >= 0) for trace in traces]
    length = max(len(trace.input_ids) for trace in traces)
    input_ids = np.full((len(traces), length), pad_id, dtype=np.int64)  # (B, T)
    for row, trace in enumerate(traces):
        input_ids[row, :len(trace.input_ids)] = trace.input_ids
    # (B, T) averaging weights over each trace's question positions [question_start, prompt_tokens)
    question_weights = np.zeros((len(traces), length), dtype=np.float32)
    for row, trace in enumerate(traces):
        start, stop = trace.question_start, max(trace.prompt_tokens, trace.question_start + 1)
        question_weights[row, start:stop] = 1.0 / (stop - start)
    arrays = {
        "input_ids": input_ids,
        "question_weights": question_weights,
        "flat_positions": np.concatenate([row * length + pos for row, pos in enumerate(loss_positions)]),  # (N,)
        "targets": np.concatenate([t.input_ids[pos + 1] for t, pos in zip(traces, loss_positions)]),  # (N,)
        **loss_layout([t.loss_span[pos] for t, pos in zip(traces, loss_positions)]),
    }
    return {name: torch.from_numpy(array).pin_memory() if pin else torch.from_numpy(array)
            for name, array in arrays.items()}


class PendingBatch:
    """A batch whose results are still being computed or copied; collect() waits once."""

    def __init__(self, results: dict[str, torch.Tensor], n_spans: list[int], event) -> None:
        self.results, self.n_spans, self.event = results, n_spans, event

    def collect(self) -> list[TraceNumbers]:
        if self.event is not None:
            self.event.synchronize()
        arrays = {name: tensor.numpy() for name, tensor in self.results.items()}
        head = arrays.get("head_gram")
        return [TraceNumbers(arrays["span_loss"][row, :k], arrays["proxy_gram"][row, :k, :k],
                             None if head is None else head[row, :k, :k], arrays["prompt_embedding"][row])
                for row, k in enumerate(self.n_spans)]


# SDPA registered under a name transformers' mask builders do not know: for such an attention implementation
# masking_utils builds no mask at all (its "custom attention without mask creation" exit), so the kernel runs
# plain causal, as it already did for extract's mask-free batches, but without the two host reads on the way:
# find_packed_sequence_indices' `(mask[:, -1] == 0).all()` on the position ids, and fast_all on a padding mask.
CAUSAL_SDPA = "grace_causal_sdpa"


def use_mask_free_causal_attention(model) -> bool:
    """Switch a model whose every layer is plain causal full attention from sdpa to CAUSAL_SDPA; False (model
    untouched) where a mask carries more than causality: sliding windows, mixed layer types, bidirectional
    attention, another attention kernel."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if model.config._attn_implementation != "sdpa" or sliding or set(layer_types) != {"full_attention"} \
            or not getattr(config, "is_causal", True):
        return False
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    model.set_attn_implementation(CAUSAL_SDPA)
    return model.config._attn_implementation == CAUSAL_SDPA


class ProxyModel:
    """A causal LM loaded for extraction: final hidden states from the decoder, logits from its head."""

    mask_free = True  # batches need no attention mask (right padding, causal attention): see launch

    def __init__(self, model_dir: Path, device: str) -> None:
        self.device = device
        self.identity = model_identity(model_dir)
        self.tokenizer, self.model = self._load(model_dir)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{model_dir}: extract needs a fast tokenizer (character offsets for span mapping)")
        self.model = self.model.to(device).eval()
        self.model.requires_grad_(False)
        self.causal_sdpa = self.mask_free and use_mask_free_causal_attention(self.model)
        self.decoder, self.head = self.model.base_model, self.model.get_output_embeddings()
        self.head_weight = self.head.weight.detach().float()  # (V, d) fp32 for the proxy products
        text_config = self.model.config.get_text_config()  # the model's own config, or a VLM's language model's
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.cuda = device.startswith("cuda")
        self.head_dtype = torch.bfloat16 if self.cuda else torch.float32
        self.context_length = getattr(text_config, "max_position_embeddings", None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.forward_calls = 0  # batches run through the model, for stats (and tests of the cache)
        self._check_logits()

    def _load(self, model_dir: Path):
        """(tokenizer, model) in fp32; a vision-language scorer loads its own classes (tasks/curate/vlm.py)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return (AutoTokenizer.from_pretrained(model_dir),
                AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))

    def encode(self, traces: list[tuple[str, str, list[tuple[int, int]]]], *, chat_template: bool,
               max_length: int) -> list[EncodedTrace | SpanError]:
        """(prompt_messages JSON, scored_response, spans) triples -> model inputs with loss spans (tasks/curate/spans.py)."""
        return encode_traces(self.tokenizer, traces, chat_template=chat_template, max_length=max_length)

    def model_inputs(self, traces: list[EncodedTrace]) -> dict[str, torch.Tensor]:
        """Inputs besides input_ids for one batch, host side: none for a causal LM (a VLM's pixels: tasks/curate/vlm.py)."""
        return {}

    def _autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.head(hidden)  # (C, V)

    def _check_logits(self) -> None:
        """Refuse a model whose logits are not head(h) (up to the known soft-cap): the proxy would be wrong."""
        ids = torch.tensor([self.tokenizer("Probe: 12 + 30 = 42.")["input_ids"]], device=self.device)
        with torch.inference_mode(), self._autocast():
            theirs = self.model(input_ids=ids).logits.float()
            ours = self.head(self.decoder(input_ids=ids).last_hidden_state).float()
        if self.softcap is not None:
            ours = self.softcap * torch.tanh(ours / self.softcap)
        if not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-3 * float(theirs.abs().max()) + 1e-5):
            raise ValueError(f"{type(self.model).__name__} computes logits from hidden states in a way extract does "
                             "not model (logit scaling?); its gradient proxy would be wrong")

    def launch(self, traces: list[EncodedTrace], head_variant: bool) -> PendingBatch:
        """Queue one forward pass and the span summaries of a batch; no host sync on CUDA."""
        host = collate(traces, self.pad_id, pin=self.cuda)
        chunk_pieces = host["chunk_pieces"].tolist()  # host side: the chunk loop needs no device sync
        batch = {name: tensor.to(self.device, non_blocking=True) for name, tensor in host.items()}
        extra = {name: tensor.to(self.device) for name, tensor in self.model_inputs(traces).items()}
        self.forward_calls += 1
        with torch.inference_mode(), fixed_threads(self.device):
            with self._autocast():
                # No attention_mask (collate): with one, transformers reads it back to decide whether
                # SDPA may run plain causal (masking_utils.fast_all), a host sync per batch on CUDA; without,
                # the same causal kernel runs and real positions get the same numbers (tested). And under
                # CAUSAL_SDPA no mask is built at all: not even the packed-sequence check on position ids,
                # another host read per batch (found by benchmarks/gpu_check.py on an H200).
                hidden = self.decoder(input_ids=batch["input_ids"], use_cache=False,
                                      **extra).last_hidden_state  # (B, T, d)
            # the question's mean state, for clustering problems: a by-product of this same forward; fp32,
            # outside autocast, which would run the einsum's bmm in bf16 (and .numpy() has no bf16)
            prompt_embedding = torch.einsum("bt,btd->bd", batch["question_weights"], hidden.float())  # (B, d)
            hidden = hidden.flatten(0, 1)[batch["flat_positions"]]  # (N, d) only loss positions reach the head
            with self._autocast():
                logits = self.head(hidden) if head_variant else None  # (N, V): the head Gram needs all at once
            if head_variant:
                summaries = span_summaries(hidden.float(), logits, batch["targets"], batch, self.head_weight,
                                           softcap=self.softcap, head_dtype=self.head_dtype)
            else:  # bounded memory for long traces: (LOGIT_CHUNK, V) logits at a time
                summaries = _summaries(*chunked_span_sums(hidden, batch["targets"], batch, self._logits,
                                                          self.head_weight, chunk_pieces, softcap=self.softcap),
                                       batch)
            results = {"span_loss": summaries.span_loss, "proxy_gram": summaries.proxy_gram,
                       "prompt_embedding": prompt_embedding}
            if summaries.head_gram is not None:
                results["head_gram"] = summaries.head_gram
            results = {name: tensor.to("cpu", non_blocking=self.cuda) for name, tensor in results.items()}
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        return PendingBatch(results, [trace.n_spans for trace in traces], event)
