"""Architecture adapters over mlx-lm's own model classes: capture raw K/V, inject predicted K/V.

KV Prediction works on *raw* keys: after the key projection, before the key norm and before RoPE
(as corenet's predictor does). mlx-lm caches keys after norm and RoPE, so:
- capture: each architecture's registry entry (:mod:`kvp_mlx.architectures`) names the projections
  its raw K/V pass through (``k_proj`` / ``v_proj``, or a fused or interleaved qkv projection).
  For the duration of a forward pass those projections are wrapped in taps that keep what they
  return; nothing is read back from a cache (a ``RotatingKVCache`` reorders and trims what it holds);
- inject: predicted raw keys get the layer's key norm and RoPE (where the layer applies it) at
  their positions, as the entry says, then are
  written with the values into the model's own cache (``make_prompt_cache``: sliding-window
  layers keep their ``RotatingKVCache``), in the chunks a chunked prefill would write.
No model code is copied: every architecture runs through its own mlx-lm class.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from kvp_mlx.architectures import ARCHITECTURES, Architecture, architecture_of, model_type_of  # noqa: F401
from kvp_mlx.errors import KVPError
from kvp_mlx.predictor import KVShape


@dataclass
class RawKV:
    """One layer's raw keys and values ``[B, H, L, D]`` as recorded: one array per forward pass."""

    keys: list[mx.array] = field(default_factory=list)
    values: list[mx.array] = field(default_factory=list)

    def record(self, kind: str, y: mx.array) -> None:
        """Keep ``y`` [B, L, H, D] (a projection's output split into heads) as ``[B, H, L, D]``."""
        (self.keys if kind == "k" else self.values).append(y.transpose(0, 2, 1, 3))


Arch = Architecture  # the registry's entry (kvp_mlx.architectures)
arch_of = architecture_of


def attention_modules(model: nn.Module) -> list[nn.Module]:
    arch = arch_of(model)
    return [arch.attention_of(layer) for layer in model.layers]


def cache_offsets(cache: list) -> list[int]:
    """The positions each positional layer cache holds (KVCache and kin, inside a CacheList too).
    Recurrent states (ArraysCache, MambaCache) count no positions and are left out."""
    offsets = []
    for c in cache:
        for part in getattr(c, "caches", None) or (c,):
            if hasattr(part, "offset"):
                offsets.append(int(part.offset))
    return offsets


def counted_positions(cache: list) -> int | None:
    """How many positions a cache holds, where any layer counts them; None for a cache of only
    recurrent states (a state-space model such as mamba: its states do not say how many tokens
    they absorbed)."""
    offsets = set(cache_offsets(cache))
    if len(offsets) > 1:
        raise KVPError(f"the cache's layers hold different numbers of positions: {sorted(offsets)}")
    if offsets:
        return offsets.pop()
    return 0 if all(c.empty() for c in cache) else None


def held_positions(cache: list) -> int:
    """How many positions an mlx-lm cache holds (every positional layer must agree; a hybrid's
    recurrent states count none)."""
    held = counted_positions(cache)
    if held is None:
        raise KVPError("the cache holds only recurrent states (a state-space model): it does not count the "
                       "positions it absorbed, so it cannot be extended or trimmed")
    return held


def sliding_window_layers(model: nn.Module) -> list[int]:
    """Indices of the layers mlx-lm gives a sliding-window (``RotatingKVCache``) cache."""
    return [i for i, c in enumerate(make_prompt_cache(model)) if isinstance(c, RotatingKVCache)]


def kv_shapes(model: nn.Module) -> list[KVShape]:
    """Per layer: number of KV heads and head dim (the key projection's output size over the heads)."""
    arch = arch_of(model)
    return [KVShape(arch.kv_heads(attn), arch.head_dim(attn)) for attn in attention_modules(model)]


class _Tap(nn.Module):
    """Wraps a submodule: returns its output unchanged, after handing it to ``record``."""

    def __init__(self, inner: nn.Module, record: Callable[[mx.array], None]):
        super().__init__()
        self.inner = inner
        self._record = record

    def __call__(self, x: mx.array) -> mx.array:
        y = self.inner(x)
        self._record(y)
        return y


@contextlib.contextmanager
def recording_raw_kv(model: nn.Module) -> Iterator[list[RawKV]]:
    """Within the block, every forward pass appends each layer's raw keys and values ``[B, H, L, D]``.

    Yields one :class:`RawKV` per layer; a chunked prefill appends one array per chunk. The taps
    wrap the architecture's own projection modules (quantized or not) and add no operation to
    the model's graph, so they work inside ``nn.value_and_grad`` too.
    """
    arch = arch_of(model)
    sinks: list[RawKV] = []
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for attn in attention_modules(model):
            sink = RawKV()
            sinks.append(sink)
            for name, record in arch.raw_kv.taps(arch.q_heads(attn), arch.kv_heads(attn), sink.record).items():
                if name not in attn:
                    raise KVPError(
                        f"{model_type_of(model)}: mlx-lm's {type(attn).__name__} has no '{name}', where this "
                        "runtime captures raw K/V (an mlx-lm release this version does not support?)"
                    )
                inner = attn[name]
                setattr(attn, name, _Tap(inner, record))
                swapped.append((attn, name, inner))
        yield sinks
    finally:
        for attn, name, inner in reversed(swapped):
            setattr(attn, name, inner)


def _concat_chunks(chunks: list[mx.array]) -> mx.array:
    return chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=2)


def prefill_capturing_raw_kv(
    model: nn.Module, tokens: mx.array, prefill_step_size: int = 2048, max_kv_size: int | None = None,
    cache: list | None = None, progress: Callable[[int, int], None] | None = None,
) -> tuple[list, list[mx.array], list[mx.array], mx.array]:
    """Run ``model`` over ``tokens`` [B, T] in chunks; return (cache, raw keys, values, last logits).

    The cache is mlx-lm's own (``make_prompt_cache(model, max_kv_size)``). Raw keys and values
    are per layer, ``[B, H, T, D]``, as the hook saw them. Last logits are ``[B, vocab]`` for the
    final token (used by the ``aux`` baseline). ``cache`` (an existing cache) is extended in
    place: ``tokens`` then go at its next positions. ``progress(processed, T)``: before the first
    chunk and after each (kvp_mlx.progress).
    """
    cache = make_prompt_cache(model, max_kv_size) if cache is None else cache
    logits = None
    with recording_raw_kv(model) as sinks:
        for start in range(0, tokens.shape[1], prefill_step_size):
            if progress is not None and start == 0:
                progress(0, tokens.shape[1])
            logits = model(tokens[:, start : start + prefill_step_size], cache=cache)
            mx.eval([(c.keys, c.values) for c in cache], [(s.keys[-1], s.values[-1]) for s in sinks])
            if progress is not None:
                progress(min(start + prefill_step_size, tokens.shape[1]), tokens.shape[1])
    keys = [_concat_chunks(s.keys) for s in sinks]
    values = [_concat_chunks(s.values) for s in sinks]
    assert logits is not None  # at least one chunk ran
    return cache, keys, values, logits[:, -1, :]


def base_cache_keys(model: nn.Module, attn: nn.Module, raw_keys: mx.array, offset: int = 0) -> mx.array:
    """Raw keys of ``model``'s layer ``attn`` as the layer caches them: its key norm, then RoPE at
    ``offset`` where the layer applies it (:meth:`Architecture.cache_keys`)."""
    return arch_of(model).cache_keys(attn, raw_keys, offset)


def inject_raw_kv(
    model: nn.Module,
    raw_kv: list[tuple[mx.array, mx.array]],
    cache: list | None = None,
    offset: int = 0,
    dtype: mx.Dtype | None = None,
    prefill_step_size: int = 2048,
    max_kv_size: int | None = None,
) -> list:
    """Write raw K/V for positions ``offset .. offset + L - 1`` into ``model``'s cache.

    ``raw_kv[i] = (keys, values)``, ``[B, H, L, D]``, cast to ``dtype`` (the model's compute
    dtype) when given. Each layer's keys get its key norm and RoPE at their positions. ``cache``
    is an existing cache holding exactly ``offset`` positions, or None for a fresh
    ``make_prompt_cache(model, max_kv_size)`` (then ``offset`` must be 0). Entries are written in
    ``prefill_step_size`` chunks, as mlx-lm's chunked prefill writes them, so a sliding-window
    layer's ``RotatingKVCache`` ends up holding what the model's own prefill would leave there.
    """
    arch, attns = arch_of(model), attention_modules(model)
    if len(raw_kv) != len(attns):
        raise KVPError(f"got K/V for {len(raw_kv)} layers, the model has {len(attns)}")
    cache = make_prompt_cache(model, max_kv_size) if cache is None else cache
    if len(cache) != len(attns):
        raise KVPError(f"got a cache of {len(cache)} layers, the model has {len(attns)}")
    held = sorted({c.offset for c in cache})
    if held != [offset]:
        holds = " or ".join(map(str, held))
        raise KVPError(f"cannot write K/V from position {offset}: the cache holds {holds} positions")
    if prefill_step_size < 1:
        raise KVPError("the prefill step size must be positive")
    length = raw_kv[0][0].shape[2]
    for start in range(0, length, prefill_step_size):
        for attn, c, (keys, values) in zip(attns, cache, raw_kv):
            keys = keys[..., start : start + prefill_step_size, :]
            values = values[..., start : start + prefill_step_size, :]
            if dtype is not None:
                keys, values = keys.astype(dtype), values.astype(dtype)
            c.update_and_fetch(arch.cache_keys(attn, keys, offset + start), values)
        mx.eval([(c.keys, c.values) for c in cache])
    return cache


class SequenceCache:
    """A stand-in cache for one whole-sequence forward pass (training) that substitutes given
    K/V (already normed and roped) for the layer's own: the base model then attends only to
    predicted K/V, causally, as corenet trains KV Prediction."""

    offset = 0

    def __init__(self, replace: tuple[mx.array, mx.array]):
        self._replace = replace

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self._replace

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        return create_attention_mask(mx.zeros((1, n, 1)), None, window_size, return_array)


def forward_raw_kv(model: nn.Module, tokens: mx.array) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """One differentiable forward pass: (logits [B, T, V], raw keys per layer, values per layer)."""
    with recording_raw_kv(model) as sinks:
        logits = model(tokens)
    return logits, [s.keys[0] for s in sinks], [s.values[0] for s in sinks]


def forward_with_predicted_kv(
    model: nn.Module, tokens: mx.array, raw_kv: list[tuple[mx.array, mx.array]]
) -> mx.array:
    """Logits of ``model`` over ``tokens`` attending (causally) only to the given raw K/V."""
    arch = arch_of(model)
    caches = [
        SequenceCache(replace=(arch.cache_keys(attn, k), v))
        for attn, (k, v) in zip(attention_modules(model), raw_kv)
    ]
    return model(tokens, cache=caches)
