"""The projected gradient source: exact at full dimension, within its error bound when projected, seeded."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from tasks.curate import score as score_stage
from tasks.diagnostics.exact import ExactModel, ExactSpec
from tasks.core.artifacts import read_extract
from tasks.curate.extract import Params, extract, plan_shards
from tasks.curate.projected import ProjectedModel, ProjectedSpec
from tasks.curate.proxy import ProxyModel
from tasks.core.stage import ParamsError, params_from_dict
from tests.conftest import build_tiny_model_dir
from tests.tasks.diagnostics.test_exact import assert_gram_close, encode_rows, fresh_model
from tests.tasks.curate.test_extract import params as extract_params
from tests.tasks.curate.test_extract import segments  # noqa: F401 (fixture)

SEEDS = range(8)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, bpe_tokenizer):
    """Every factor wider than the default projection_dim (32): d_in, d_out in {64, 128, 256}."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("wide"), bpe_tokenizer, seed=3, hidden=128)


def autograd_layer_grads(model_dir, names: list[str], trace) -> list[list[torch.Tensor]]:
    """Reference: per span, the model's own logits, a standard CE, torch.autograd.grad of the named weights."""
    model = fresh_model(model_dir)
    modules = dict(model.named_modules())
    weights = [modules[name].weight.requires_grad_(True) for name in names]
    ids = torch.as_tensor(trace.input_ids)[None]  # (1, T)
    logits = model(input_ids=ids).logits[0, :-1]  # (T-1, V)
    grads = []
    for k in range(trace.n_spans):
        mask = torch.as_tensor(trace.loss_span[:-1] == k)
        loss = F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum")
        grads.append([g.double() for g in torch.autograd.grad(loss, weights, retain_graph=True)])
    return grads  # [span][layer] (d_out, d_in)


def gram_of(grads) -> np.ndarray:
    vectors = torch.stack([torch.cat([g.reshape(-1) for g in span]) for span in grads])  # (K+1, P)
    return (vectors @ vectors.T).numpy()


@pytest.mark.parametrize("blocks", [None, 1])
def test_full_dimension_equals_autograd_weight_gradients(tiny_model_dir, bpe_tokenizer, gsm_rows, blocks):
    model = ProjectedModel(tiny_model_dir, "cpu", ProjectedSpec(target="linear", blocks=blocks, dim=None))
    assert len(model.layers) == 7 * (blocks or 2)  # q, k, v, o, gate, up, down per block
    names = [name for name, _ in model.layers]
    traces = encode_rows(bpe_tokenizer, gsm_rows)
    for trace, numbers in zip(traces, model.launch(traces, head_variant=True).collect()):
        assert_gram_close(numbers.projected_gram, gram_of(autograd_layer_grads(tiny_model_dir, names, trace)))
        assert numbers.head_gram is not None and numbers.proxy_gram.shape == numbers.projected_gram.shape


@pytest.mark.parametrize("model_fixture, tokenizer_fixture", [("tiny_model_dir", "bpe_tokenizer"),
                                                              ("tiny_sp_model_dir", "sentencepiece_tokenizer")])
def test_full_dimension_target_full_equals_exact_mode_full(request, gsm_rows, model_fixture, tokenizer_fixture):
    """Every parameter, untied (embedding and head apart) and tied (one matrix, both uses): exact mode's full Gram."""
    model_dir, tokenizer = request.getfixturevalue(model_fixture), request.getfixturevalue(tokenizer_fixture)
    model = ProjectedModel(model_dir, "cpu", ProjectedSpec(target="full", dim=None))
    exact = ExactModel(model_dir, ExactSpec("full"))
    assert model.tied == (model_fixture == "tiny_sp_model_dir") and model.dimension == exact.n_parameters
    traces = encode_rows(tokenizer, gsm_rows)
    linear = ProjectedModel(model_dir, "cpu", ProjectedSpec(target="linear", dim=None))
    for trace, numbers in zip(traces, model.launch(traces, head_variant=False).collect()):
        reference = exact.grams(trace).gram
        assert_gram_close(numbers.projected_gram, reference)
        assert not np.allclose(linear.trace_numbers(trace, False).projected_gram, reference, rtol=1e-3)


def test_full_dimension_lora_equals_exact_mode(tiny_sp_model_dir, sentencepiece_tokenizer, gsm_rows):
    """LoRA adapters as tasks/diagnostics/exact.py makes them (same seed, rank, modules): dL/dB's Gram is exact mode's."""
    model = ProjectedModel(tiny_sp_model_dir, "cpu", ProjectedSpec(target="lora", dim=None))
    assert all(".lora_B." in name for name, _ in model.layers) and len(model.layers) == 8
    exact = ExactModel(tiny_sp_model_dir, ExactSpec("lora"))
    traces = encode_rows(sentencepiece_tokenizer, gsm_rows)
    for trace, numbers in zip(traces, model.launch(traces, head_variant=False).collect()):
        reference = exact.grams(trace)
        assert_gram_close(numbers.projected_gram, reference.gram, rtol=1e-4)
        np.testing.assert_allclose(numbers.span_loss_sums, reference.span_loss_sums, rtol=1e-5)


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_default_projection_is_within_its_error_bound(wide_model_dir, bpe_tokenizer, gsm_rows, projection):
    """Per Gram entry, Var(G^_ij - G_ij) <= v * sum_l |g_il|^2 |g_jl|^2, v = (1 + 2/k)^2 - 1 (projected module).

    Over 8 fixed seeds (so the test is deterministic) and every entry of every trace: the mean of the
    squared error in units of that bound must stay below 1, and the seed-averaged error (bias) below
    the bound of a mean of 8. A wrong scale (1/k instead of 1/sqrt(k)) or correlated factors fail it.
    Target linear: the bound is about projected matrices (full adds gains, kept whole).
    """
    k = Params().projection_dim
    v = (1 + 2 / k) ** 2 - 1
    traces = encode_rows(bpe_tokenizer, gsm_rows)
    models = [ProjectedModel(wide_model_dir, "cpu", ProjectedSpec("linear", dim=k, projection=projection, seed=s))
              for s in SEEDS]
    names = [name for name, _ in models[0].layers]
    assert all(p_in is not None and p_out is not None for p_in, p_out in models[0].projections)
    squared, biased = [], []
    for trace in traces:
        grads = autograd_layer_grads(wide_model_dir, names, trace)
        exact = gram_of(grads)
        layer_sq = np.array([[float(g.square().sum()) for g in span] for span in grads])  # (K+1, L)
        bound = v * layer_sq @ layer_sq.T  # (K+1, K+1)
        errors = np.stack([m.trace_numbers(trace, False).projected_gram - exact for m in models])  # (seeds, K+1, K+1)
        squared.append((errors ** 2 / bound).ravel())
        biased.append((errors.mean(axis=0) ** 2 / (bound / len(SEEDS))).ravel())
    assert np.concatenate(squared).mean() < 1.0
    assert np.concatenate(biased).mean() < 1.0


def test_seeded_projection_is_deterministic(wide_model_dir, bpe_tokenizer, gsm_rows):
    trace = encode_rows(bpe_tokenizer, gsm_rows)[0]
    first, again, other = (ProjectedModel(wide_model_dir, "cpu", ProjectedSpec(seed=s)).trace_numbers(trace, False)
                           for s in (0, 0, 1))
    assert np.array_equal(first.projected_gram, again.projected_gram)
    assert not np.allclose(first.projected_gram, other.projected_gram)


def test_batched_vector_jacobian_products_equal_the_loop(wide_model_dir, bpe_tokenizer, gsm_rows):
    model = ProjectedModel(wide_model_dir, "cpu", ProjectedSpec())
    traces = encode_rows(bpe_tokenizer, gsm_rows)
    batched = model.launch(traces, head_variant=False).collect()
    assert model.batched is True  # vmap covers the Llama ops: the batched path is the one measured
    model.batched = False
    for vmapped, looped in zip(batched, model.launch(traces, head_variant=False).collect()):
        assert_gram_close(vmapped.projected_gram, looped.projected_gram, rtol=1e-6)


def test_projected_under_bf16_autocast_runs_near_fp32(wide_model_dir, bpe_tokenizer, gsm_rows, monkeypatch):
    """CUDA's bf16 autocast, emulated by the CPU's (issue 24): the probes' inputs are projected in fp32 (under
    autocast x @ P_in came out bf16 and met the fp32 upstream signal in one einsum), the Grams stay near fp32."""
    model = ProjectedModel(wide_model_dir, "cpu", ProjectedSpec())
    traces = encode_rows(bpe_tokenizer, gsm_rows)
    fp32 = model.launch(traces, head_variant=False).collect()
    monkeypatch.setattr(ProxyModel, "_autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    for ours, theirs in zip(model.launch(traces, head_variant=False).collect(), fp32):
        assert ours.projected_gram.dtype == np.float64
        assert_gram_close(ours.projected_gram, theirs.projected_gram, rtol=5e-2)


def test_cache_keys_change_only_when_projected_is_on(tmp_path, segments, tiny_model_dir):
    default = plan_shards(segments, extract_params(tmp_path), tiny_model_dir)
    assert "projected" not in default[0].key_head  # every existing cache keeps its keys
    on = plan_shards(segments, extract_params(tmp_path, projected=True), tiny_model_dir)
    other_seed = plan_shards(segments, extract_params(tmp_path, projected=True, projection_seed=1), tiny_model_dir)
    assert len({default[0].fingerprint, on[0].fingerprint, other_seed[0].fingerprint}) == 3


def test_bad_projected_settings_are_refused():
    for bad in ({"projection_dim": 0}, {"projected_target": "conv"}, {"projection": "sparse"},
                {"projected_target": "full", "projected_blocks": 2}):
        with pytest.raises(ParamsError, match="extract.projected settings"):
            params_from_dict(Params, "extract", bad)


def test_score_gradient_projected_end_to_end(tmp_path, segments, tiny_model_dir):
    plain = tmp_path / "plain"
    extract(segments, tiny_model_dir, plain, extract_params(tmp_path, cache_dir=None))
    with pytest.raises(ValueError, match="extract.projected: true"):
        score_stage.score(plain, tmp_path / "score-plain", score_stage.Params(gradient="projected"))
    out = tmp_path / "projected"
    stats = extract(segments, tiny_model_dir, out, extract_params(tmp_path, projected=True))
    table = read_extract(out)
    assert stats["kept"] == table.num_rows == 6 and table["projected_gram"].null_count == 0
    plain_table = read_extract(plain)
    # the same forward gives the proxy too: equal to a plain extract's up to batch rounding
    proxy, plain_proxy = (np.concatenate(t["proxy_gram"].to_pylist()) for t in (table, plain_table))
    np.testing.assert_allclose(proxy, plain_proxy, rtol=1e-4, atol=1e-6 * np.abs(plain_proxy).max())
    scored = score_stage.score(out, tmp_path / "score", score_stage.Params(gradient="projected"))
    assert scored["kept"] == 6 and scored["gradient"] == "projected"
    steps = pq.read_table(tmp_path / "score" / "step_scores.parquet")
    assert steps.num_rows == sum(table["n_steps"].to_pylist())
    # a rerun in a fresh output directory is served by the cache, quarantine outcomes included
    again = extract(segments, tiny_model_dir, tmp_path / "again", extract_params(tmp_path, projected=True))
    assert (again["traces_cached"], again["traces_computed"]) == (8, 0)
    assert read_extract(tmp_path / "again").equals(table)
