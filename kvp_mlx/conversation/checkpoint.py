"""Putting caches back as they were: what a turn changes is marked before it starts and restored if
the turn does not finish (an exception, Ctrl-C, a signal, an exception thrown into its stream).

mlx-lm writes caches in place (``update_and_fetch``, ``trim``). A plain or quantized layer
(``KVCache``, ``QuantizedKVCache``) only ever writes at or past its offset, so its offset is the
whole mark: trimming back to it restores the layer exactly, and nothing is copied. Any other layer
(rotating, compressed, ...), and one the operation will cut below its offset, is kept as a
:func:`twin`: a shallow copy whose arrays are new array objects over the same buffers. Nothing is
copied when the mark is made; the live layer's next write makes MLX write a new buffer (the old
one is still referenced), once per layer and operation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from kvp_mlx.errors import KVPError

APPEND_ONLY = (KVCache, QuantizedKVCache)  # write only at or past their offset; trim() is exact


def _fresh(value: Any) -> Any:
    if isinstance(value, mx.array):
        return mx.array(value)  # a new array object: later in-place writes to the old one miss it
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v) for v in value)
    return value


def twin(layer: Any) -> Any:
    """A copy of a cache layer that later writes to ``layer`` leave as it is (no data is copied)."""
    out = copy.copy(layer)
    out.__dict__.update({k: _fresh(v) for k, v in vars(layer).items()})
    return out


@dataclass
class CacheMark:
    """A list of cache layers as it was: each layer's offset (append-only layers) or a twin."""

    cache: list  # the list itself: restored in place, so every holder of it sees the restored layers
    layers: list
    saved: list  # per layer: an offset to trim back to, or a twin to put back

    @classmethod
    def of(cls, cache: list, floor: int | None = None) -> "CacheMark":
        """Mark ``cache`` before an operation that writes at positions ``floor`` and later (None: at
        or past each layer's offset)."""
        saved = [c.offset if type(c) in APPEND_ONLY and (floor is None or c.offset <= floor) else twin(c)
                 for c in cache]
        return cls(cache, list(cache), saved)

    def restore(self) -> None:
        layers = []
        for layer, saved in zip(self.layers, self.saved):
            if isinstance(saved, int):
                if layer.offset < saved:
                    raise KVPError("internal: a marked cache layer was cut below its mark")
                layer.trim(layer.offset - saved)
                layers.append(layer)
            else:
                layers.append(saved)
        self.cache[:] = layers  # the original layer objects (a quantized replacement is dropped)
