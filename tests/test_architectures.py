"""Per-architecture contracts with mlx-lm: where raw K/V pass, which model class a config gets,
and what the runtime refuses."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from kvp_mlx import testing as mb
from kvp_mlx.adapters import (
    ARCHITECTURES, arch_of, attention_modules, base_cache_keys, kv_shapes, model_type_of, recording_raw_kv,
)
from kvp_mlx.errors import KVPError
from kvp_mlx.mlx_lm_private import model_classes
from kvp_mlx.flops import model_shape
from kvp_mlx.model import load
from kvp_mlx.training.losses import KVPTrainable, LossWeights, kvp_loss

from conftest import VOCAB

ALL = sorted(ARCHITECTURES)  # every registered architecture (model_type names)


def _tiny(arch: str, quantized: bool = False) -> nn.Module:
    model = mb.build_model(mb.tiny_config(arch, n_layers=3, vocab_size=VOCAB), seed=11)
    if quantized:
        nn.quantize(model, group_size=32, bits=8)
        mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
@pytest.mark.parametrize("arch", ALL)
def test_hooked_raw_kv_reproduce_mlx_lm_cache(arch, quantized):
    """Raw K/V seen by the architecture's hook, after its key norm and RoPE, are exactly what
    mlx-lm's own chunked prefill stores in its cache (two chunks: RoPE offsets matter)."""
    model = _tiny(arch, quantized)
    name = model_type_of(model)
    if quantized:
        assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    tokens = mx.random.randint(0, VOCAB, (2, 13), key=mx.random.key(0))
    cache = make_prompt_cache(model)
    with recording_raw_kv(model) as sinks:
        for chunk in (tokens[:, :7], tokens[:, 7:]):
            model(chunk, cache=cache)
    assert all(type(a[n]).__name__ != "_Tap" for a in attention_modules(model) for n in a), "taps left behind"
    for layer, (attn, sink, c) in enumerate(zip(attention_modules(model), sinks, cache)):
        assert len(sink.keys) == len(sink.values) == 2, (
            f"{name}: the hook saw {len(sink.keys)} passes, not 2; mlx-lm changed where keys pass"
        )
        keys = mx.concatenate(sink.keys, axis=2)
        values = mx.concatenate(sink.values, axis=2)
        cached_keys, cached_values = c.keys[..., :13, :], c.values[..., :13, :]
        assert keys.shape == cached_keys.shape, f"{name}: captured keys {keys.shape} vs cached {cached_keys.shape}"
        key_diff = mx.abs(base_cache_keys(model, attn, keys) - cached_keys).max().item()
        assert key_diff <= 1e-6, (
            f"{name}: captured raw keys no longer reproduce mlx-lm's cached keys (layer {layer}, "
            f"max diff {key_diff}); mlx-lm changed where keys pass"
        )
        value_diff = mx.abs(values - cached_values).max().item()
        assert value_diff <= 1e-6, (
            f"{name}: captured raw values no longer equal mlx-lm's cached values (layer {layer}, "
            f"max diff {value_diff}); mlx-lm changed where values pass"
        )


@pytest.mark.parametrize("arch", ALL)
def test_hook_works_inside_value_and_grad(arch):
    """The captured keys carry gradients to the projection that made them."""
    model = _tiny(arch)
    tokens = mx.random.randint(0, VOCAB, (1, 9), key=mx.random.key(1))

    def loss_fn(_: dict) -> mx.array:
        with recording_raw_kv(model) as sinks:
            model(tokens)
        return sum((s.keys[0] ** 2).sum() + s.values[0].sum() for s in sinks)

    loss, grads = nn.value_and_grad(model, loss_fn)(model.trainable_parameters())
    proj = arch_of(model).raw_kv.projections()[0]
    suffix = f".2.{arch_of(model).attention_attr}.{proj}.weight"  # layer 2 (model.layers or model.h)
    (g,) = [v for k, v in tree_flatten(grads) if k.endswith(suffix)]
    assert mx.isfinite(loss).item()
    assert mx.abs(g).max().item() > 0, f"{arch}: no gradient reached {proj} through the hook"


@pytest.mark.parametrize("arch", ALL)
def test_build_model_follows_mlx_lm_model_type_resolution(arch):
    cfg = mb.tiny_config(arch, n_layers=2, vocab_size=VOCAB)
    model = mb.build_model(cfg)
    assert type(model) is model_classes(cfg)[0]
    assert model_type_of(model) in ARCHITECTURES
    arch_of(model)


def test_mistral_is_mlx_lm_llama_with_its_own_model_type():
    model = mb.build_model(mb.tiny_config("mistral", vocab_size=VOCAB))
    assert type(model).__module__ == "mlx_lm.models.llama"
    assert model_type_of(model) == "mistral"


def test_gemma3_mixes_sliding_and_global_layers():
    model = _tiny("gemma3")
    assert [type(c) for c in make_prompt_cache(model)] == [RotatingKVCache, KVCache, RotatingKVCache]
    assert [c.max_size for c in make_prompt_cache(model)[::2]] == [8, 8]
    assert [(s.heads, s.head_dim) for s in kv_shapes(model)] == [(2, 16)] * 3
    shape = model_shape(model)
    assert len(shape.layers) == 3 and shape.lm_head == 2 * 64 * VOCAB
    # q 64x64, o 64x64, MLP 3 x 64x128 (per token, 2 FLOPs per multiply-add); k, v 64x32 each
    assert all(layer.kv_proj == 2 * 2 * 64 * 32 for layer in shape.layers)
    assert all(layer.other_proj == 2 * (2 * 64 * 64 + 3 * 64 * 128) for layer in shape.layers)


def test_layer_pruning_refuses_to_change_which_layers_slide():
    cfg = mb.tiny_config("gemma3", n_layers=3, vocab_size=VOCAB)
    model = mb.build_model(cfg)
    with pytest.raises(ValueError, match="sliding window"):
        mb.layer_pruned(model, cfg, [0, 2])
    pruned, pruned_cfg = mb.layer_pruned(model, cfg, [0, 1])
    assert pruned_cfg["num_hidden_layers"] == 2


def test_runahead_refuses_sliding_windows_before_any_work(identity_dirs):
    model = load(identity_dirs["gemma3"])
    tokens = mx.random.randint(0, VOCAB, (1, 12), key=mx.random.key(2))
    # no group is given: refusing before joining one means nothing waits for peers
    message = r"runahead does not support gemma3_text: sliding-window layers"
    with pytest.raises(KVPError, match=message):
        model.prefill(tokens, method="runahead")


def test_training_loss_runs_on_gemma3(identity_dirs):
    """The consistency and CE losses over a sliding-window pair: an identity predictor of a copied
    auxiliary predicts the base's K/V exactly (L1 = 0)."""
    model = load(identity_dirs["gemma3"])
    batch = mx.random.randint(0, VOCAB, (2, 17), key=mx.random.key(3))
    trainable = KVPTrainable(model.aux, model.predictor)
    loss, metrics = kvp_loss(model.base, trainable, batch, LossWeights())
    assert mx.isfinite(loss).item()
    assert metrics["l1"].item() <= 1e-6
    assert abs(metrics["ce"].item() - metrics["ce_aux"].item()) <= 1e-4


@pytest.mark.parametrize("arch", ALL)
def test_layer_pruned_prefix_keeps_the_base_layers_cache(arch):
    """Keeping layers {0, 1} of 3 (the entry's layer-count key and per-layer config lists): the
    pruned model's caches equal the base's first two layers' after the same prefill."""
    cfg = mb.tiny_config(arch, n_layers=3, vocab_size=VOCAB)
    model = mb.build_model(cfg, seed=5)
    pruned, pruned_cfg = mb.layer_pruned(model, cfg, [0, 1])
    assert mb.num_layers(pruned_cfg) == 2 and len(pruned.layers) == 2
    tokens = mx.random.randint(0, VOCAB, (1, 11), key=mx.random.key(4))
    ours, theirs = make_prompt_cache(model), make_prompt_cache(pruned)
    model(tokens, cache=ours)
    pruned(tokens, cache=theirs)
    for a, b in zip(ours[:2], theirs):
        assert type(a) is type(b)
        assert mx.array_equal(a.state[0], b.state[0]).item(), f"{arch}: pruned keys differ"


def test_layer_pruning_keeps_per_layer_rope_lists():
    """smollm3's per-layer NoPE list follows the kept layers; cohere2 refuses a pruning that would
    turn a NoPE global layer into a RoPE one."""
    cfg = mb.tiny_config("smollm3", n_layers=3, vocab_size=VOCAB)  # no_rope_layers [1, 0, 1]
    model = mb.build_model(cfg)
    _, pruned_cfg = mb.layer_pruned(model, {**cfg, "no_rope_layers": [1, 0, 1]}, [1, 2])
    assert pruned_cfg["no_rope_layers"] == [0, 1]
    cfg = mb.tiny_config("cohere2", n_layers=3, vocab_size=VOCAB)  # S G S
    with pytest.raises(ValueError, match="sliding window|apply RoPE"):
        mb.layer_pruned(mb.build_model(cfg), cfg, [1, 2])
