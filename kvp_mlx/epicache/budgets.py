"""Per-layer KV budgets from a sensitivity profile (EpiCache's layer-wise budget allocation).

Sensitivity of layer l: the cosine similarity ``s_l`` between its keys under full causal attention
and under a block-restricted mask (each query sees ``sink`` first tokens and the causal part of a
``block``-token window that advances in half-blocks: 50% overlap), averaged over 100-token windows
and over heads; profiled once per model on one long text and stored beside the model
(``epicache_profile.json``). Allocation: min-max normalise s, ``w_l = (1 - s_l) ** alpha``,
``budget_l = int(w_l * L * M / sum(w))``, each clamped to at least ``M / 4``; ``alpha = 0`` gives
uniform budgets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_causal_mask

from kvp_mlx.errors import KVPError

PROFILE_FILE = "epicache_profile.json"


def block_mask(n: int, block: int, sink: int) -> mx.array:
    """``[n, n]`` bool: query p sees key j <= p when j < sink or j >= start(p), where start(p) is
    the beginning of the window of ``block`` tokens ending with p's half-block."""
    half = max(1, block // 2)
    p = np.arange(n)[:, None]
    j = np.arange(n)[None]
    start = np.maximum(0, (p // half - 1) * half)
    return mx.array((j <= p) & ((j < sink) | (j >= start)))


class _ProfileCache:
    """A stand-in cache for one whole-sequence pass: records the layer's keys, imposes a mask."""

    offset = 0

    def __init__(self, mask: mx.array | None):
        self.mask = mask
        self.keys: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = keys
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        mask = self.mask if self.mask is not None else create_causal_mask(n)
        if window_size is not None:
            mask = mask & create_causal_mask(n, window_size=window_size)
        return mask


def _keys(model: nn.Module, tokens: mx.array, mask: mx.array | None) -> list[mx.array]:
    caches = [_ProfileCache(mask) for _ in model.layers]
    model(tokens, cache=caches)
    out = [c.keys for c in caches]
    mx.eval(out)
    return [k for k in out if k is not None]


def sensitivity(model: nn.Module, tokens: Sequence[int], block: int = 4096, sink: int = 128,
                window: int = 100) -> list[float]:
    """Per layer: mean cosine similarity of keys, full causal vs block-restricted attention."""
    n = len(tokens)
    if n <= block // 2:
        raise KVPError(f"the profile text ({n} tokens) must be longer than half a block ({block // 2})")
    ids = mx.array([list(tokens)], dtype=mx.int32)
    full = _keys(model, ids, None)
    restricted = _keys(model, ids, block_mask(n, block, sink))
    out = []
    for a, b in zip(full, restricted):
        a32, b32 = a[0].astype(mx.float32), b[0].astype(mx.float32)  # [H, n, D]
        cos = (a32 * b32).sum(-1) / mx.maximum(mx.linalg.norm(a32, axis=-1) * mx.linalg.norm(b32, axis=-1), 1e-12)
        per_pos = np.array(cos.mean(axis=0))  # over heads
        means = [per_pos[i : i + window].mean() for i in range(0, n, window)]
        out.append(float(np.mean(means)))
    return out


def allocate(sens: Sequence[float], budget: int, alpha: float) -> list[int]:
    """Per-layer budgets from sensitivities (the formula above)."""
    s = np.asarray(sens, dtype=np.float64)
    if s.size == 0:
        raise KVPError("no layer sensitivities")
    if alpha < 0:
        raise KVPError("alpha must be >= 0")
    span = s.max() - s.min()
    norm = (s - s.min()) / span if span > 0 else np.zeros_like(s)
    weight = (1.0 - norm) ** alpha
    raw = (weight * len(s) * budget / weight.sum()).astype(int)
    return [int(b) for b in np.maximum(raw, budget // 4)]


def save_profile(directory: str | Path, sens: Sequence[float], **info: Any) -> Path:
    path = Path(directory) / PROFILE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sensitivity": [float(x) for x in sens], **info}, indent=2))
    tmp.replace(path)
    return path


def load_profile(directory: str | Path) -> list[float]:
    path = Path(directory) / PROFILE_FILE
    if not path.is_file():
        raise KVPError(f"{path} does not exist: run `kvp-mlx epicache-profile --model {directory}` first "
                       "(or use alpha 0)")
    try:
        data = json.loads(path.read_text())
        sens = data["sensitivity"]
        return [float(x) for x in sens]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise KVPError(f"{path}: unreadable profile ({type(e).__name__}: {e}), field 'sensitivity'") from None


def budgets_for(model_dir: str | Path | None, n_layers: int, budget: int, alpha: float) -> list[int]:
    """Uniform budgets for ``alpha == 0``; else from the profile stored beside the model."""
    if alpha == 0:
        return [budget] * n_layers
    if model_dir is None:
        raise KVPError("non-uniform budgets need a model directory holding a profile")
    sens = load_profile(model_dir)
    if len(sens) != n_layers:
        raise KVPError(f"{Path(model_dir) / PROFILE_FILE}: {len(sens)} layers, the model has {n_layers}")
    return allocate(sens, budget, alpha)
