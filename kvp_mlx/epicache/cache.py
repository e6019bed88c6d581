"""A compressed KV cache for mlx-lm models: kept entries per KV head, padded, with their true positions.

After eviction the KV heads of one layer may keep different numbers of entries ("pair" eviction),
so a layer holds a padded tensor ``[1, H, S, D]`` and a validity mask ``[H, S]``; entries appended
afterwards (new blocks, a question, a reply) are valid for every head. Keys are stored as the model
caches them (after its key norm and RoPE at their true positions), and ``offset`` is the true
conversation position (what RoPE uses for the next token), not the stored length.

mlx-lm builds one attention mask per forward pass from the first layer's cache and hands it to every
layer, but padding differs per layer. :func:`enable_compressed_caches` therefore gives each attention
module of a model a subclass of its own class (same parameters, same code) whose call asks the
layer's own cache for the mask when that cache is one of ours (``epicache_mask``); with any other
cache it changes nothing. The same seam lets a scoring pass read a layer's queries.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import RotatingKVCache

from kvp_mlx.mlx_lm_private import BaseCache

from kvp_mlx.adapters import attention_modules
from kvp_mlx.architectures import architecture_of_attention
from kvp_mlx.layerwise import project_qkv

_SUBCLASSES: dict[type, type] = {}


def _masked_subclass(cls: type) -> type:
    if getattr(cls, "_epicache_masked", False):
        return cls
    if cls not in _SUBCLASSES:
        def __call__(self: Any, x: mx.array, mask: Any = None, cache: Any = None, *args: Any,
                     **kwargs: Any) -> mx.array:
            hook: Callable | None = getattr(cache, "epicache_mask", None)
            if hook is not None:
                mask = hook(self, x)
            return cls.__call__(self, x, mask, cache, *args, **kwargs)

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_epicache_masked": True,
                                                       "__module__": cls.__module__})
    return _SUBCLASSES[cls]


def enable_compressed_caches(model: nn.Module) -> nn.Module:
    """Let ``model``'s attention layers take per-layer masks from compressed caches (idempotent).

    Parameters, weights and behaviour with mlx-lm's own caches are unchanged."""
    for attn in attention_modules(model):
        attn.__class__ = _masked_subclass(type(attn))
    return model


def layer_queries(attn: nn.Module, x: mx.array, offset: int) -> mx.array:
    """The queries ``[1, Hq, L, D]`` the attention module computes for its input ``x`` at positions
    ``offset ..``: its own projection, query norm and RoPE (kvp_mlx.layerwise)."""
    q, _, _ = project_qkv(attn, x)
    return attn.rope(q, offset=offset) if architecture_of_attention(attn).applies_rope(attn) else q


class CompressedKVCache(BaseCache):
    """One layer's cache: kept entries (padded per head) then appended ones, at true positions."""

    step = 256

    def __init__(self, n_heads: int, n_q_heads: int):
        self.n_heads, self.n_q_heads = n_heads, n_q_heads
        self.keys: mx.array | None = None  # [1, H, capacity, D]; the first `length` slots are in use
        self.values: mx.array | None = None
        self.length = 0  # stored slots (padded), <= capacity
        self.offset = 0  # the true conversation position
        self.valid: mx.array | None = None  # [H, length] bool; None: every slot is valid
        self.positions: mx.array = mx.zeros((n_heads, 0), dtype=mx.int32)  # true position per slot (-1: pad)
        self.compressed = 0  # slots [0, compressed) came from the last eviction; the rest were appended
        self.query_sink: list[mx.array] | None = None  # set during a scoring pass: queries recorded here
        self.query_last: int | None = None  # record only the last n queries (SnapKV's window)

    # --- what mlx-lm's attention calls --------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        if self.keys is None or self.length + n > self.keys.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            k_shape = (1, self.n_heads, self.length + grow, keys.shape[3])
            v_shape = (1, self.n_heads, self.length + grow, values.shape[3])
            new_k, new_v = mx.zeros(k_shape, keys.dtype), mx.zeros(v_shape, values.dtype)
            if self.keys is not None and self.values is not None:
                new_k[..., : self.length, :] = self.keys[..., : self.length, :]
                new_v[..., : self.length, :] = self.values[..., : self.length, :]
            self.keys, self.values = new_k, new_v
        assert self.keys is not None and self.values is not None
        self.keys[..., self.length : self.length + n, :] = keys
        self.values[..., self.length : self.length + n, :] = values
        new_pos = mx.broadcast_to(mx.arange(self.offset, self.offset + n, dtype=mx.int32)[None], (self.n_heads, n))
        self.positions = mx.concatenate([self.positions, new_pos], axis=1)
        if self.valid is not None:
            self.valid = mx.concatenate([self.valid, mx.ones((self.n_heads, n), dtype=mx.bool_)], axis=1)
        self.length += n
        self.offset += n
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        if window_size is not None:
            raise NotImplementedError("a compressed cache is for global-attention layers only")
        if self.valid is None:
            if n == 1 and not return_array:
                return None
            if not return_array:
                return "causal"
        return self.mask_for(n, self.length + n)

    def epicache_mask(self, attn: nn.Module, x: mx.array) -> Any:
        """The mask this layer uses for ``x`` [1, n, dim] (called by the attention before it runs)."""
        if self.query_sink is not None:
            last = self.query_last or x.shape[1]
            start = x.shape[1] - min(last, x.shape[1])
            self.query_sink.append(layer_queries(attn, x[:, start:], self.offset + start))
        return self.make_mask(x.shape[1])

    def mask_for(self, n: int, total: int) -> mx.array:
        """Boolean mask ``[1, Hq, n, total]``: the ``n`` newest of ``total`` slots are causal among
        themselves, padded slots are masked for the heads they pad."""
        rows = mx.arange(total - n, total)[:, None]
        causal = rows >= mx.arange(total)[None]  # [n, total]
        if self.valid is None:
            return causal[None, None]
        valid = self.valid
        if valid.shape[1] < total:
            valid = mx.concatenate([valid, mx.ones((self.n_heads, total - valid.shape[1]), mx.bool_)], axis=1)
        per_q = mx.repeat(valid, self.n_q_heads // self.n_heads, axis=0)  # q head j reads kv head j // rep
        return (per_q[:, None, :] & causal[None])[None]

    # --- state ---------------------------------------------------------------------------------

    def stored(self) -> tuple[mx.array, mx.array]:
        """Keys and values in use, ``[1, H, length, D]``."""
        assert self.keys is not None and self.values is not None
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def valid_mask(self) -> mx.array:
        """``[H, length]`` bool."""
        return self.valid if self.valid is not None else mx.ones((self.n_heads, self.length), dtype=mx.bool_)

    def replace(self, keys: mx.array, values: mx.array, valid: mx.array | None, positions: mx.array) -> None:
        """Hold exactly these slots (the result of an eviction); ``offset`` stays."""
        self.keys, self.values, self.positions = keys, values, positions
        self.length = self.compressed = keys.shape[2]
        self.valid = None if valid is None or bool(mx.all(valid)) else valid

    def copy(self) -> "CompressedKVCache":
        """An independent copy (arrays are shared until one side writes: writes replace them)."""
        twin = CompressedKVCache(self.n_heads, self.n_q_heads)
        if self.keys is not None and self.values is not None:
            k, v = self.stored()
            twin.keys, twin.values = mx.array(k), mx.array(v)
        twin.length, twin.offset, twin.compressed = self.length, self.offset, self.compressed
        twin.valid, twin.positions = self.valid, self.positions
        return twin

    @property
    def state(self) -> list:
        """What a saved session holds (mlx-lm's prompt-cache format): the stored keys and values,
        the validity mask, the true positions, and ``[n_heads, n_q_heads, offset, compressed]``."""
        scalars = mx.array([self.n_heads, self.n_q_heads, self.offset, self.compressed], dtype=mx.int64)
        if self.keys is None or self.values is None:
            return [scalars]
        k, v = self.stored()
        return [k, v, self.valid_mask(), self.positions, scalars]

    @state.setter
    def state(self, v: list) -> None:
        n_heads, n_q_heads, offset, compressed = (int(x) for x in v[-1].tolist())
        CompressedKVCache.__init__(self, n_heads, n_q_heads)
        self.offset = offset
        if len(v) == 5:
            keys, values, valid, positions = v[:4]
            if keys.shape[1] != n_heads or valid.shape != (n_heads, keys.shape[2]) or positions.shape != valid.shape:
                raise ValueError("inconsistent compressed cache state")
            self.replace(keys, values, valid.astype(mx.bool_), positions.astype(mx.int32))
        self.compressed = compressed

    @property
    def nbytes(self) -> int:
        """Bytes of the slots in use (keys and values; padded slots count)."""
        if self.keys is None or self.values is None:
            return 0
        k, v = self.stored()
        return k.nbytes + v.nbytes

    def kept_entries(self) -> int:
        """Valid (non-padded) entries over all heads."""
        return int(self.valid.sum()) if self.valid is not None else self.length * self.n_heads

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest ``n`` appended entries (never compressed ones); returns how many went."""
        n = max(0, min(n, self.length - self.compressed))
        self.length -= n
        self.offset -= n
        self.positions = self.positions[:, : self.length]
        if self.valid is not None:
            self.valid = self.valid[:, : self.length]
        return n

    def empty(self) -> bool:
        return self.keys is None


def copy_cache(cache: list) -> list:
    """Independent copies of a compressed-memory cache list (sliding-window layers included)."""
    out: list = []
    for c in cache:
        if isinstance(c, CompressedKVCache):
            out.append(c.copy())
        elif isinstance(c, RotatingKVCache):
            twin = RotatingKVCache(c.max_size, c.keep)
            keys, values, *position = c.state  # this mlx-lm's state holds the write position too
            twin.state = (None if keys is None else mx.array(keys), None if values is None else mx.array(values),
                          *position)
            out.append(twin)
        else:
            raise TypeError(f"cannot copy a {type(c).__name__}")
    return out
