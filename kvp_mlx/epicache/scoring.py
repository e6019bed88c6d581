"""What the built-in scorers compute, for any :class:`kvp_mlx.epicache.prefill.Scorer`: the
attention that queries pay to the entries of a compressed cache, recency, and the queries of a
patched prompt run after what a cache holds (its K/V dropped again)."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.adapters import arch_of, attention_modules
from kvp_mlx.epicache.cache import CompressedKVCache, copy_cache
from kvp_mlx.errors import KVPError


def inner_model(model: nn.Module) -> nn.Module:
    """The model without its head (logits are not needed while building a memory)."""
    return getattr(model, arch_of(model).inner_attr)


def compressed_layers(cache: list) -> list[tuple[int, CompressedKVCache]]:
    """``(layer, cache)`` of the compressed layers (sliding-window layers are left out)."""
    return [(i, c) for i, c in enumerate(cache) if isinstance(c, CompressedKVCache)]


def attention_scores(queries: mx.array, query_positions: mx.array, keys: mx.array, positions: mx.array,
                     valid: mx.array, scale: float) -> mx.array:
    """Per KV head and key: the max over its GQA query heads and over the queries of the softmax
    (over the visible keys) of ``q k^T * scale``. ``queries`` [1, Hq, P, D] at ``query_positions``
    [P]; ``keys`` [1, H, S, D] with true ``positions`` [H, S] and ``valid`` [H, S]; a key is visible
    to a query when valid and not after it. Returns ``[H, S]`` float32, -inf where invalid."""
    _, n_q, n_p, d = queries.shape
    n_kv = keys.shape[1]
    q = queries.astype(mx.float32).reshape(n_kv, n_q // n_kv, n_p, d)
    logits = (q * scale) @ keys[0].astype(mx.float32).transpose(0, 2, 1)[:, None]  # [H, rep, P, S]
    visible = valid[:, None, :] & (positions[:, None, :] <= query_positions[None, :, None])  # [H, P, S]
    logits = mx.where(visible[:, None], logits, -mx.inf)
    probs = mx.softmax(logits, axis=-1, precise=True)
    probs = mx.where(visible[:, None], probs, 0.0)  # a query that sees nothing contributes nothing
    best = probs.max(axis=(1, 2))
    return mx.where(valid, best, -mx.inf)


def recency_scores(positions: mx.array, valid: mx.array, sinks: int) -> mx.array:
    """Higher for more recent positions, highest for the first ``sinks``; -inf where invalid."""
    pos = positions.astype(mx.float32)
    scores = mx.where(positions < sinks, mx.inf, pos)
    return mx.where(valid, scores, -mx.inf)


def query_scores(model: nn.Module, cache: list, queries: dict) -> dict[int, mx.array]:
    """Scores ``{layer: [H, S]}`` of every compressed layer's entries under the attention of
    ``queries`` (``{layer: (queries [1, Hq, P, D], positions [P])}``): :func:`attention_scores`."""
    attns = attention_modules(model)
    out = {}
    for i, c in compressed_layers(cache):
        q, q_pos = queries[i]
        keys, _ = c.stored()
        out[i] = attention_scores(q, q_pos, keys, c.positions, c.valid_mask(), float(attns[i].scale))
    return out


def prompt_queries(model: nn.Module, cache: list, tokens: Sequence[int]) -> dict:
    """Run a patched prompt after what ``cache`` holds (its K/V are dropped afterwards); return
    ``{layer: (queries [1, Hq, P, D], positions [P])}`` of the compressed layers."""
    if not tokens:
        raise KVPError("the scoring prompt is empty")
    layers = compressed_layers(cache)
    run = [c if isinstance(c, CompressedKVCache) else copy_cache([c])[0] for c in cache]
    for _, c in layers:
        c.query_sink, c.query_last = [], None
    start = layers[0][1].offset if layers else 0
    try:
        inner_model(model)(mx.array([list(tokens)], dtype=mx.int32), cache=run)
        queries = {i: c.query_sink[0] for i, c in layers if c.query_sink}
        mx.eval(queries)
    finally:
        for _, c in layers:
            c.query_sink = None
            c.trim(len(tokens))  # drop the prompt's own K/V
    positions = mx.arange(start, start + len(tokens))
    return {i: (q, positions) for i, q in queries.items()}
