"""Architecture adapters over mlx-lm's own model classes: capture raw K/V, inject predicted K/V.

KV Prediction works on *raw* keys: after the key projection, before the key norm and before RoPE
(kv-prediction.md). mlx-lm caches keys after norm and RoPE, so:
- capture: for the duration of a forward pass, each attention's ``k_norm`` (or, without a key
  norm, its ``rope``) is wrapped in a recorder that keeps the keys it receives; values are raw
  and read from the cache;
- inject: predicted raw keys get the layer's ``k_norm`` and ``rope(offset=0)``, then are written
  with the values into a fresh ``KVCache``.
No model code is copied: every architecture runs through its own mlx-lm class.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from kvp_mlx.errors import KVPError
from kvp_mlx.predictor import KVShape


@dataclass(frozen=True)
class Arch:
    """Where an architecture keeps its attention module and what its key norm sees."""

    attention_attr: str
    # Layout of the tensor the key norm receives: "bhld" (openelm) or "blhd" (qwen3).
    key_norm_layout: str | None
    # Names of the block's other parts and of the model's ends (for kvp_mlx.layerwise).
    attn_norm_attr: str = "input_layernorm"
    mlp_norm_attr: str = "post_attention_layernorm"
    mlp_attr: str = "mlp"
    out_proj_attr: str = "o_proj"
    inner_attr: str = "model"  # model.<inner> holds the embedding and the final norm
    embed_attr: str = "embed_tokens"


ARCHITECTURES: dict[str, Arch] = {
    "openelm": Arch("attn", "bhld", "attn_norm", "ffn_norm", "ffn", "out_proj", "transformer", "token_embeddings"),
    "llama": Arch("self_attn", None),
    "mistral": Arch("self_attn", None),
    "qwen2": Arch("self_attn", None),
    "qwen3": Arch("self_attn", "blhd"),
}


def arch_of(model: nn.Module) -> Arch:
    model_type = getattr(model, "model_type", None) or getattr(
        getattr(model, "args", None), "model_type", None
    )
    if model_type not in ARCHITECTURES:
        raise KVPError(
            f"unsupported architecture '{model_type}' (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    arch = arch_of(model)
    return [getattr(layer, arch.attention_attr) for layer in model.layers]


def kv_shapes(model: nn.Module) -> list[KVShape]:
    """Per layer: number of KV heads and head dim, read from the key projection's output size."""
    shapes = []
    for attn in attention_modules(model):
        n_kv = attn.n_kv_heads
        if hasattr(attn, "head_dim"):
            head_dim = attn.head_dim
        elif hasattr(attn, "k_proj"):
            head_dim = attn.k_proj.weight.shape[0] // n_kv
        else:
            raise KVPError(f"cannot read the head dim of {type(attn).__name__}")
        shapes.append(KVShape(int(n_kv), int(head_dim)))
    return shapes


class _KeyNormRecorder(nn.Module):
    """Wraps ``k_norm``: records its input (the raw keys) in ``[B, H, L, D]`` layout."""

    def __init__(self, inner: nn.Module, layout: str, sink: list):
        super().__init__()
        self.inner = inner
        self._layout = layout
        self._sink = sink

    def __call__(self, x: mx.array) -> mx.array:
        self._sink.append(x if self._layout == "bhld" else x.transpose(0, 2, 1, 3))
        return self.inner(x)


class _RopeKeyRecorder(nn.Module):
    """Wraps ``rope`` of an attention without key norm: every second call receives the keys."""

    def __init__(self, inner: nn.Module, sink: list):
        super().__init__()
        self.inner = inner
        self._sink = sink
        self._calls = 0

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        self._calls += 1
        if self._calls % 2 == 0:  # queries first, then keys (mlx-lm's order in every supported arch)
            self._sink.append(x)
        return self.inner(x, offset=offset)


@contextlib.contextmanager
def recording_raw_keys(model: nn.Module) -> Iterator[list[list[mx.array]]]:
    """Within the block, every forward pass appends each layer's raw keys ``[B, H, L, D]``.

    Yields one list per layer; chunked prefill appends one array per chunk.
    """
    arch = arch_of(model)
    sinks: list[list[mx.array]] = []
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for attn in attention_modules(model):
            sink: list[mx.array] = []
            sinks.append(sink)
            if arch.key_norm_layout and "k_norm" in attn:
                inner, name = attn.k_norm, "k_norm"
                setattr(attn, name, _KeyNormRecorder(inner, arch.key_norm_layout, sink))
            else:
                inner, name = attn.rope, "rope"
                setattr(attn, name, _RopeKeyRecorder(inner, sink))
            swapped.append((attn, name, inner))
        yield sinks
    finally:
        for attn, name, inner in swapped:
            setattr(attn, name, inner)


def cache_values(cache: list[KVCache]) -> list[mx.array]:
    """Each layer's cached values (raw: no norm, no RoPE) as ``[B, H, L, D]``."""
    return [c.state[1][..., : c.offset, :] for c in cache]


def _concat_chunks(chunks: list[mx.array]) -> mx.array:
    return chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=2)


def prefill_capturing_raw_kv(
    model: nn.Module, tokens: mx.array, prefill_step_size: int = 2048
) -> tuple[list[KVCache], list[mx.array], list[mx.array], mx.array]:
    """Run ``model`` over ``tokens`` [B, T] in chunks; return (cache, raw keys, values, last logits).

    Raw keys and values are per layer, ``[B, H, T, D]``. Last logits are ``[B, vocab]`` for the
    final token (used by the ``aux`` baseline).
    """
    cache = [KVCache() for _ in model.layers]
    logits = None
    with recording_raw_keys(model) as key_chunks:
        for start in range(0, tokens.shape[1], prefill_step_size):
            logits = model(tokens[:, start : start + prefill_step_size], cache=cache)
            mx.eval([c.state for c in cache], [chunks[-1] for chunks in key_chunks])
    keys = [_concat_chunks(chunks) for chunks in key_chunks]
    assert logits is not None, "empty prompt"
    return cache, keys, cache_values(cache), logits[:, -1, :]


def base_cache_keys(attn: nn.Module, raw_keys: mx.array, offset: int = 0) -> mx.array:
    """Raw keys as the layer caches them: its key norm (where it has one), then RoPE at ``offset``."""
    if "k_norm" in attn:
        raw_keys = attn.k_norm(raw_keys)  # RMSNorm over head_dim: the layout does not matter
    return attn.rope(raw_keys, offset=offset)


def inject_raw_kv(
    model: nn.Module, raw_kv: list[tuple[mx.array, mx.array]], dtype: mx.Dtype | None = None
) -> list[KVCache]:
    """A fresh base cache holding raw K/V per layer, with the layer's key norm and RoPE applied.

    ``raw_kv[i] = (keys, values)``, ``[B, H, L, D]``, for positions 0..L-1; cast to ``dtype``
    (the base model's compute dtype) when given.
    """
    attns = attention_modules(model)
    if len(raw_kv) != len(attns):
        raise KVPError(f"got K/V for {len(raw_kv)} layers, the model has {len(attns)}")
    cache = []
    for attn, (keys, values) in zip(attns, raw_kv):
        if dtype is not None:
            keys, values = keys.astype(dtype), values.astype(dtype)
        c = KVCache()
        c.update_and_fetch(base_cache_keys(attn, keys), values)
        cache.append(c)
    return cache


class SequenceCache:
    """A stand-in cache for one whole-sequence forward pass (training, calibration).

    It records the values each layer produces and either returns the layer's own K/V or, with
    ``replace``, substitutes given K/V (already normed and roped): the base model then attends
    only to predicted K/V, causally, as corenet trains KV Prediction.
    """

    offset = 0

    def __init__(self, replace: tuple[mx.array, mx.array] | None = None):
        self.values: mx.array | None = None
        self._replace = replace

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.values = values
        return self._replace if self._replace is not None else (keys, values)

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        return create_attention_mask(mx.zeros((1, n, 1)), None, window_size, return_array)


def forward_raw_kv(model: nn.Module, tokens: mx.array) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """One differentiable forward pass: (logits [B, T, V], raw keys per layer, values per layer)."""
    caches = [SequenceCache() for _ in model.layers]
    with recording_raw_keys(model) as key_sinks:
        logits = model(tokens, cache=caches)
    return logits, [sink[0] for sink in key_sinks], [c.values for c in caches]  # type: ignore[misc]  # all set


def forward_with_predicted_kv(
    model: nn.Module, tokens: mx.array, raw_kv: list[tuple[mx.array, mx.array]]
) -> mx.array:
    """Logits of ``model`` over ``tokens`` attending (causally) only to the given raw K/V."""
    caches = [
        SequenceCache(replace=(base_cache_keys(attn, k), v))
        for attn, (k, v) in zip(attention_modules(model), raw_kv)
    ]
    return model(tokens, cache=caches)
