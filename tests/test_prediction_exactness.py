"""KV Prediction with exact predictors must reproduce the base model."""

from __future__ import annotations

import mlx.core as mx
import pytest

from kvp_mlx import testing as mb
from kvp_mlx.adapters import inject_raw_kv, prefill_capturing_raw_kv
from kvp_mlx.errors import KVPError
from kvp_mlx.methods import PrefillResult
from kvp_mlx.methods.base import fill_cache
from kvp_mlx.methods.kvp import predict_base_cache
from kvp_mlx.model import load
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from decoding import decode_greedy
from conftest import ARCHS, VOCAB


def prompt(batch: int, length: int, seed: int = 0) -> mx.array:
    return mx.random.randint(0, VOCAB, (batch, length), key=mx.random.key(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_identity_predictor_reproduces_base(identity_dirs, arch, batch):
    """Both prefills run in the same chunks (one of 21 tokens; 8 + 8 + 5), so they do the same
    float operations: chunking alone moves gemma3's logits by ~1e-5 on some CPUs' BLAS, which
    is mlx-lm's rounding, not KV Prediction's."""
    model = load(identity_dirs[arch])
    tokens = prompt(batch, 21, seed=batch)
    for step in (2048, 8):
        base = model.prefill(tokens, method="base", prefill_step_size=step)
        kvp = model.prefill(tokens, method="kvp", prefill_step_size=step)
        diff = mx.abs(base.logits - kvp.logits).max().item()
        assert diff <= 1e-5, f"{arch} B={batch} step {step}: first-token logits differ by {diff}"
    base_tokens = decode_greedy(base, 16)
    kvp_tokens = decode_greedy(kvp, 16)
    assert base_tokens.shape == (batch, 16)
    assert mx.array_equal(base_tokens, kvp_tokens).item()


def _same_cache(a, b, what: str, tol: float = 1e-5) -> None:
    """Two caches of the same classes and sizes holding the same K/V (within ``tol``)."""
    assert type(a) is type(b), f"{what}: {type(a).__name__} != {type(b).__name__}"
    assert a.offset == b.offset, f"{what}: offset {a.offset} != {b.offset}"
    assert a.keys.shape == b.keys.shape, f"{what}: stored {a.keys.shape} != {b.keys.shape}"
    if isinstance(a, RotatingKVCache):
        assert a._idx == b._idx, f"{what}: write index {a._idx} != {b._idx}"
    for x, y in ((a.keys, b.keys), (a.values, b.values)):
        assert mx.abs(x - y).max().item() <= tol, what


@pytest.mark.parametrize("arch,keep", [
    ("openelm", [0, 2]), ("qwen3", [0, 2]), ("llama", [0, 2]), ("mistral", [0, 2]),
    ("gemma3", [0, 1]),  # S G S: dropping the middle layer would make the config's pattern S G
])
def test_layer_pruned_identity_injects_the_kept_layers_cache(identity_dirs, arch, keep):
    """Aux = base layers ``keep``; each kept base layer mapped to itself with identity maps ->
    the injected cache of those base layers equals the cache those same layers (the aux's
    layers, with the base's weights) hold after mlx-lm's own prefill."""
    model = load(identity_dirs[arch])
    cfg = mb.tiny_config(arch, n_layers=3, vocab_size=VOCAB)
    aux, _ = mb.layer_pruned(model.base, cfg, keep)
    mapping = [max(j for j, k in enumerate(keep) if k <= i) for i in range(3)]
    pred = mb.make_predictor(model.base, aux, mapping=mapping, init="identity")
    tokens = prompt(2, 13)
    _, keys, values, _ = prefill_capturing_raw_kv(aux, tokens, 2048)
    injected = inject_raw_kv(model.base, pred(keys, values))
    own = make_prompt_cache(aux)
    aux(tokens, cache=own)
    for aux_layer, base_layer in enumerate(keep):
        _same_cache(injected[base_layer], own[aux_layer], f"{arch} base layer {base_layer}")


@pytest.mark.parametrize("arch", ["openelm", "llama", "gemma3"])
def test_layer_pruned_aux_of_prefix_layers_is_exact(identity_dirs, arch):
    """Keeping a prefix of layers {0, 1}: those two base layers' injected caches equal the base's."""
    model = load(identity_dirs[arch])
    cfg = mb.tiny_config(arch, n_layers=3, vocab_size=VOCAB)
    aux, _ = mb.layer_pruned(model.base, cfg, [0, 1])
    pred = mb.make_predictor(model.base, aux, mapping=[0, 1, 1], init="identity")
    tokens = prompt(1, 17, seed=5)
    _, keys, values, _ = prefill_capturing_raw_kv(aux, tokens, 2048)
    injected = inject_raw_kv(model.base, pred(keys, values))
    reference = fill_cache(model.base, tokens, 2048)
    for layer in (0, 1):
        _same_cache(injected[layer], reference[layer], f"{arch} layer {layer}")


@pytest.mark.parametrize("step", [8, 5, 3, 2048])
def test_sliding_window_prediction_has_the_base_cache_layout(identity_dirs, step):
    """gemma3 (window 8): the kvp-predicted cache of a 20-token prefix has the cache classes,
    offsets, stored lengths and write positions of the base's own chunked prefill, and (identity
    predictor) the same K/V; then both decode alike."""
    model = load(identity_dirs["gemma3"])
    tokens = prompt(2, 21, seed=4)
    predicted = predict_base_cache(model, tokens[:, :-1], step)
    reference = fill_cache(model.base, tokens[:, :-1], step)
    assert any(isinstance(c, RotatingKVCache) for c in reference)
    for layer, (a, b) in enumerate(zip(predicted, reference)):
        _same_cache(a, b, f"gemma3 step {step} layer {layer}")
    kvp = model.prefill(tokens, method="kvp", prefill_step_size=step)
    base = model.prefill(tokens, method="base", prefill_step_size=step)
    assert mx.abs(kvp.logits - base.logits).max().item() <= 1e-5
    assert mx.array_equal(decode_greedy(kvp, 12), decode_greedy(base, 12)).item()


def test_injecting_into_a_warm_cache_extends_it(identity_dirs):
    """Raw K/V of positions 12..19 written after a cache already holding 0..11 (a RotatingKVCache
    on gemma3's sliding layers) give the cache the base's own two-chunk prefill leaves."""
    model = load(identity_dirs["gemma3"])
    tokens = prompt(1, 21, seed=6)
    _, keys, values, _ = prefill_capturing_raw_kv(model.base, tokens[:, :20], 12)
    warm = inject_raw_kv(model.base, [(k[..., :12, :], v[..., :12, :]) for k, v in zip(keys, values)])
    with pytest.raises(KVPError, match="cache holds 12 positions"):
        inject_raw_kv(model.base, [(k[..., 12:, :], v[..., 12:, :]) for k, v in zip(keys, values)], cache=warm)
    inject_raw_kv(model.base, [(k[..., 12:, :], v[..., 12:, :]) for k, v in zip(keys, values)], cache=warm, offset=12)
    reference = fill_cache(model.base, tokens[:, :20], 12)
    for layer, (a, b) in enumerate(zip(warm, reference)):
        _same_cache(a, b, f"layer {layer}", tol=0.0)
    logits = model.base(tokens[:, 20:], cache=warm)
    assert mx.array_equal(logits, model.base(tokens[:, 20:], cache=reference)).item()


def test_injected_cache_is_used(random_pair_dir):
    model = load(random_pair_dir)
    tokens = prompt(1, 12)
    before = model.prefill(tokens, method="kvp").logits
    lin = model.predictor.value_transforms[1]
    lin.bias = lin.bias + 0.5
    after = model.prefill(tokens, method="kvp").logits
    assert mx.abs(before - after).max().item() > 1e-3
    lin.bias = lin.bias - 0.5
    again = model.prefill(tokens, method="kvp").logits
    assert mx.abs(before - again).max().item() <= 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_raw_cache_round_trip_is_bit_identical(identity_dirs, arch):
    model = load(identity_dirs[arch])
    tokens = prompt(2, 19, seed=7)
    reference = model.prefill(tokens, method="base")
    _, keys, values, _ = prefill_capturing_raw_kv(model.base, tokens[:, :-1], 2048)
    cache = inject_raw_kv(model.base, list(zip(keys, values)))
    logits = model.base(tokens[:, -1:], cache=cache)[:, -1, :]
    assert mx.array_equal(logits, reference.logits).item()
    replay = PrefillResult(cache, logits, model.base, "roundtrip", {})
    assert mx.array_equal(decode_greedy(replay, 12), decode_greedy(reference, 12)).item()


def test_one_token_prompt_falls_back_to_base(random_pair_dir):
    model = load(random_pair_dir)
    tokens = prompt(2, 1)
    kvp, base = model.prefill(tokens, method="kvp"), model.prefill(tokens, method="base")
    assert mx.array_equal(kvp.logits, base.logits).item()


def test_aux_method_decodes_with_aux(random_pair_dir):
    model = load(random_pair_dir)
    tokens = prompt(1, 9)
    res = model.prefill(tokens, method="aux")
    assert res.decoder is model.aux
    full = model.aux(tokens)[:, -1, :]
    assert mx.abs(res.logits - full).max().item() <= 1e-5


def test_chunked_base_prefill_matches_whole(random_pair_dir):
    model = load(random_pair_dir)
    tokens = prompt(1, 30, seed=3)
    whole = model.prefill(tokens, method="base").logits
    chunked = model.prefill(tokens, method="base", prefill_step_size=7).logits
    assert mx.abs(whole - chunked).max().item() <= 1e-5
    full_forward = model.base(tokens)[:, -1, :]
    assert mx.abs(whole - full_forward).max().item() <= 1e-5
