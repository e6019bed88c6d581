"""KV Prediction with exact predictors must reproduce the base model (issue: core runtime)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from kvp_mlx import testing as mb
from kvp_mlx.adapters import inject_raw_kv, prefill_capturing_raw_kv
from kvp_mlx.decode import decode_greedy
from kvp_mlx.methods import PrefillResult
from kvp_mlx.model import load
from mlx_lm.models.cache import KVCache

from conftest import ARCHS, VOCAB


def prompt(batch: int, length: int, seed: int = 0) -> mx.array:
    return mx.random.randint(0, VOCAB, (batch, length), key=mx.random.key(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_identity_predictor_reproduces_base(identity_dirs, arch, batch):
    model = load(identity_dirs[arch])
    tokens = prompt(batch, 21, seed=batch)
    base = model.prefill(tokens, method="base")
    kvp = model.prefill(tokens, method="kvp", prefill_step_size=8)  # chunked aux prefill too
    diff = mx.abs(base.logits - kvp.logits).max().item()
    assert diff <= 1e-5, f"{arch} B={batch}: first-token logits differ by {diff}"
    base_tokens = decode_greedy(base, 16)
    kvp_tokens = decode_greedy(kvp, 16)
    assert base_tokens.shape == (batch, 16)
    assert mx.array_equal(base_tokens, kvp_tokens).item()


@pytest.mark.parametrize("arch", ["openelm", "qwen3", "llama"])
def test_layer_pruned_identity_injects_the_kept_layers_cache(identity_dirs, arch):
    """Aux = base layers {0, 2}; each kept base layer mapped to itself with identity maps ->
    the injected cache of base layers 0 and 2 equals the cache those same layers (the aux's
    layers 0 and 1, with the base's weights) hold after a normal mlx-lm prefill."""
    model = load(identity_dirs[arch])
    cfg = mb.tiny_config(arch, n_layers=3, vocab_size=VOCAB)
    aux, _ = mb.layer_pruned(model.base, cfg, [0, 2])
    pred = mb.make_predictor(model.base, aux, mapping=[0, 0, 1], init="identity")
    tokens = prompt(2, 13)
    _, keys, values, _ = prefill_capturing_raw_kv(aux, tokens, 2048)
    injected = inject_raw_kv(model.base, pred(keys, values))
    own = [KVCache() for _ in aux.layers]
    aux(tokens, cache=own)
    for base_layer, aux_layer in ((0, 0), (2, 1)):
        for a, b in zip(injected[base_layer].state[:2], own[aux_layer].state[:2]):
            assert mx.abs(a[..., :13, :] - b[..., :13, :]).max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["openelm", "llama"])
def test_layer_pruned_aux_of_prefix_layers_is_exact(identity_dirs, arch):
    """Keeping a prefix of layers {0, 1}: those two base layers' injected caches equal the base's."""
    model = load(identity_dirs[arch])
    cfg = mb.tiny_config(arch, n_layers=3, vocab_size=VOCAB)
    aux, _ = mb.layer_pruned(model.base, cfg, [0, 1])
    pred = mb.make_predictor(model.base, aux, mapping=[0, 1, 1], init="identity")
    tokens = prompt(1, 17, seed=5)
    _, keys, values, _ = prefill_capturing_raw_kv(aux, tokens, 2048)
    injected = inject_raw_kv(model.base, pred(keys, values))
    reference = model.prefill(mx.concatenate([tokens, tokens[:, :1]], axis=1), method="base").cache
    for layer in (0, 1):
        for a, b in zip(injected[layer].state[:2], reference[layer].state[:2]):
            assert mx.abs(a[..., :17, :] - b[..., :17, :]).max().item() <= 1e-5


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
