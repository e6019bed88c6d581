"""Architecture adapters over mlx-lm's own model classes: capture raw K/V, inject predicted K/V.

KV Prediction works on *raw* keys: after the key projection, before the key norm and before RoPE
(as corenet's predictor does). mlx-lm caches keys after norm and RoPE, so:
- capture: each architecture declares, in :data:`ARCHITECTURES`, the hook that sees its raw K/V
  (the outputs of ``k_proj`` / ``v_proj``, or of openelm's fused ``qkv_proj``). For the duration
  of a forward pass those projections are wrapped in taps that keep what they return; nothing
  is read back from a cache (a ``RotatingKVCache`` reorders and trims what it holds);
- inject: predicted raw keys get the layer's ``k_norm`` and RoPE at their positions, then are
  written with the values into the model's own cache (``make_prompt_cache``: sliding-window
  layers keep their ``RotatingKVCache``), in the chunks a chunked prefill would write.
No model code is copied: every architecture runs through its own mlx-lm class.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from kvp_mlx.errors import KVPError
from kvp_mlx.predictor import KVShape


@dataclass
class RawKV:
    """One layer's raw keys and values ``[B, H, L, D]`` as recorded: one array per forward pass."""

    keys: list[mx.array] = field(default_factory=list)
    values: list[mx.array] = field(default_factory=list)


class RawKVHook(Protocol):
    """Where an architecture's raw K/V pass: ``taps`` names the attention's submodules to wrap and
    what to do with each one's output."""

    def taps(self, attn: nn.Module, sink: RawKV) -> dict[str, Callable[[mx.array], None]]: ...


def _heads(y: mx.array, n_heads: int) -> mx.array:
    """A projection's output ``[B, L, H * D]`` as ``[B, H, L, D]``."""
    B, L, _ = y.shape
    return y.reshape(B, L, n_heads, -1).transpose(0, 2, 1, 3)


@dataclass(frozen=True)
class KVProjections:
    """Raw keys and values are the outputs of two projections, ``[B, L, kv_heads * head_dim]``."""

    keys: str = "k_proj"
    values: str = "v_proj"

    def taps(self, attn: nn.Module, sink: RawKV) -> dict[str, Callable[[mx.array], None]]:
        heads = attn.n_kv_heads
        return {
            self.keys: lambda y: sink.keys.append(_heads(y, heads)),
            self.values: lambda y: sink.values.append(_heads(y, heads)),
        }


@dataclass(frozen=True)
class FusedQKV:
    """Raw keys and values are slices of one projection: query heads, then key, then value heads."""

    attr: str = "qkv_proj"

    def taps(self, attn: nn.Module, sink: RawKV) -> dict[str, Callable[[mx.array], None]]:
        q_heads, kv_heads = attn.n_heads, attn.n_kv_heads

        def record(y: mx.array) -> None:
            qkv = _heads(y, q_heads + 2 * kv_heads)
            _, keys, values = mx.split(qkv, [q_heads, q_heads + kv_heads], axis=1)
            sink.keys.append(keys)
            sink.values.append(values)

        return {self.attr: record}


@dataclass(frozen=True)
class Arch:
    """Where an architecture keeps its attention module, where its raw K/V pass, and (for
    kvp_mlx.layerwise) the names of its blocks' parts."""

    attention_attr: str
    raw_kv: RawKVHook
    # Names of the block's other parts and of the model's ends (for kvp_mlx.layerwise).
    attn_norm_attr: str = "input_layernorm"
    mlp_norm_attr: str = "post_attention_layernorm"
    mlp_attr: str = "mlp"
    out_proj_attr: str = "o_proj"
    inner_attr: str = "model"  # model.<inner> holds the embedding and the final norm
    embed_attr: str = "embed_tokens"
    # Why kvp_mlx.layerwise cannot drive this architecture's blocks (None: it can). Its blocks are
    # x + attn(norm(x)), then + mlp(norm(.)), over unscaled token embeddings.
    not_layerwise: str | None = None


ARCHITECTURES: dict[str, Arch] = {
    "openelm": Arch(
        "attn", FusedQKV("qkv_proj"), attn_norm_attr="attn_norm", mlp_norm_attr="ffn_norm", mlp_attr="ffn",
        out_proj_attr="out_proj", inner_attr="transformer", embed_attr="token_embeddings",
    ),
    "llama": Arch("self_attn", KVProjections("k_proj", "v_proj")),
    "mistral": Arch("self_attn", KVProjections("k_proj", "v_proj")),  # mlx-lm runs it as llama
    "qwen2": Arch("self_attn", KVProjections("k_proj", "v_proj")),
    "qwen3": Arch("self_attn", KVProjections("k_proj", "v_proj")),
    "gemma3_text": Arch(
        "self_attn", KVProjections("k_proj", "v_proj"),
        not_layerwise="its blocks have extra feed-forward norms and scaled embeddings",
    ),
}


def model_type_of(model: nn.Module) -> str | None:
    return getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)


def arch_of(model: nn.Module) -> Arch:
    model_type = model_type_of(model)
    if model_type not in ARCHITECTURES:
        raise KVPError(
            f"unsupported architecture '{model_type}' (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    arch = arch_of(model)
    return [getattr(layer, arch.attention_attr) for layer in model.layers]


def sliding_window_layers(model: nn.Module) -> list[int]:
    """Indices of the layers mlx-lm gives a sliding-window (``RotatingKVCache``) cache."""
    return [i for i, c in enumerate(make_prompt_cache(model)) if isinstance(c, RotatingKVCache)]


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
            for name, record in arch.raw_kv.taps(attn, sink).items():
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


def base_cache_keys(attn: nn.Module, raw_keys: mx.array, offset: int = 0) -> mx.array:
    """Raw keys as the layer caches them: its key norm (where it has one), then RoPE at ``offset``."""
    if "k_norm" in attn:
        raw_keys = attn.k_norm(raw_keys)  # RMSNorm over head_dim: the layout does not matter
    return attn.rope(raw_keys, offset=offset)


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
    attns = attention_modules(model)
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
            c.update_and_fetch(base_cache_keys(attn, keys, offset + start), values)
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
    caches = [
        SequenceCache(replace=(base_cache_keys(attn, k), v))
        for attn, (k, v) in zip(attention_modules(model), raw_kv)
    ]
    return model(tokens, cache=caches)
