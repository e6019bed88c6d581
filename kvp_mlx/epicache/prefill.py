"""Block-wise prefill with eviction under a per-layer budget (EpiCache and its baselines).

The history is cut into blocks of ``block`` tokens. Each block is forwarded, appending to the
compressed caches; then the entries are scored and each layer keeps ``budget`` entries per KV head:
- ``pair``: one top-k per layer over all its KV heads together (``budget * n_kv_heads`` entries;
  heads end with different lengths, held padded with a mask);
- ``pair-uniform``: a top-k per head.
Peak KV memory is therefore ``budget + block`` entries per head and layer, whatever the history
length. Scores (recomputed from scratch every block) come from a :class:`Scorer`:
- :class:`PromptScorer`: a "patched prompt" runs after the block at the next positions; a key's
  score is the softmax of ``q k^T * scale`` of the prompt's queries over the retained keys plus
  the block (not over the prompt's own keys), maxed over the GQA group and the prompt positions.
  Its K/V are dropped afterwards. EpiCache (instruction + assistant header + an episode's
  medoids), KVzip ("repeat the previous context"), InfiniPot ("summarize the previous context");
- :class:`WindowScorer`: the block's own last ``window`` queries, causally (SnapKV);
- :class:`RecencyScorer`: ``sinks`` first positions plus the most recent (StreamingLLM);
- ``None``: full KV, no eviction.
Sliding-window layers (gemma3) keep mlx-lm's ``RotatingKVCache``: their window bounds them already;
only global-attention layers are compressed. With an auxiliary model and a predictor (KV
Prediction), each block is prefilled by the auxiliary (on its own compressed cache, evicted with the
same scorer) and the predictor writes the base's K/V; only the scoring prompt runs on the base.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from kvp_mlx.adapters import arch_of, attention_modules, inject_raw_kv, prefill_capturing_raw_kv
from kvp_mlx.epicache.cache import CompressedKVCache, copy_cache, enable_compressed_caches
from kvp_mlx.errors import KVPError

LEVELS = ("pair", "pair-uniform")


@dataclass(frozen=True)
class PromptScorer:
    """Score by the attention of a patched prompt (token ids) run after each block."""

    tokens: tuple[int, ...]


@dataclass(frozen=True)
class WindowScorer:
    """Score by the attention of the block's own last ``window`` queries (SnapKV)."""

    window: int = 64


@dataclass(frozen=True)
class RecencyScorer:
    """Keep the first ``sinks`` positions and the most recent ones (StreamingLLM)."""

    sinks: int = 4


Scorer = PromptScorer | WindowScorer | RecencyScorer | None


@dataclass
class Memory:
    """A compressed cache of a history, ready for the model to continue at ``position``."""

    cache: list  # per layer: CompressedKVCache, or mlx-lm's RotatingKVCache (sliding-window layers)
    position: int  # the true conversation position (every layer's offset)
    peak_slots: int = 0  # most slots (per KV head, padded) any layer held, block included
    peak_kv_bytes: int = 0  # most bytes the whole cache held (after a block, before eviction)
    seconds: float = 0.0
    blocks: int = 0
    aux_cache: list | None = None  # KV-Prediction-built: the auxiliary's own compressed cache

    def kept_entries(self) -> list[int]:
        """Per compressed layer: valid entries over all KV heads."""
        return [c.kept_entries() for c in self.cache if isinstance(c, CompressedKVCache)]

    def kv_bytes(self) -> int:
        return sum(int(c.nbytes) for c in self.cache)

    def copy(self) -> "Memory":
        """An independent copy (to answer several questions from one memory)."""
        return Memory(copy_cache(self.cache), self.position, self.peak_slots, self.peak_kv_bytes, self.seconds,
                      self.blocks, copy_cache(self.aux_cache) if self.aux_cache is not None else None)


def make_compressed_cache(model: nn.Module) -> list:
    """A fresh cache: compressed for global-attention layers, mlx-lm's for sliding-window ones."""
    enable_compressed_caches(model)
    out: list[Any] = []
    for attn, c in zip(attention_modules(model), make_prompt_cache(model)):
        if isinstance(c, RotatingKVCache):
            out.append(c)
        else:
            out.append(CompressedKVCache(int(attn.n_kv_heads), int(attn.n_heads)))
    return out


def layer_budgets(budget: int | Sequence[int], n_layers: int) -> list[int]:
    budgets = [int(budget)] * n_layers if isinstance(budget, int) else [int(b) for b in budget]
    if len(budgets) != n_layers:
        raise KVPError(f"got budgets for {len(budgets)} layers, the model has {n_layers}")
    if min(budgets) < 1:
        raise KVPError("the KV budget must be at least 1 entry per head")
    return budgets


# --- scores and eviction ----------------------------------------------------------------------

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


def select(scores: mx.array, valid: mx.array, budget: int, level: str) -> mx.array:
    """Which entries to keep, ``[H, S]`` bool: ``pair``: the ``budget * H`` highest over the layer's
    heads; ``pair-uniform``: the ``budget`` highest of each head. Invalid entries are never kept."""
    n_heads, n = scores.shape
    if level == "pair":
        k = budget * n_heads
        if int(valid.sum()) <= k:
            return valid
        flat = mx.argpartition(-scores.reshape(-1), k - 1)[:k]
        keep = mx.zeros((n_heads * n,), dtype=mx.bool_)
        keep[flat] = True
        return keep.reshape(n_heads, n) & valid
    if level == "pair-uniform":
        if n <= budget:
            return valid
        idx = mx.argpartition(-scores, budget - 1, axis=1)[:, :budget]
        keep = mx.put_along_axis(mx.zeros((n_heads, n), dtype=mx.bool_), idx, mx.array(True), axis=1)
        return keep & valid
    raise KVPError(f"unknown eviction level '{level}' (choose from {', '.join(LEVELS)})")


def evict(cache: CompressedKVCache, keep: mx.array) -> None:
    """Keep the marked slots of each head (in their order), padded to the longest head."""
    counts = keep.sum(axis=1)
    width = int(counts.max())
    n = keep.shape[1]
    idx = mx.arange(n)[None]
    order = mx.argsort(mx.where(keep, idx, idx + n), axis=1)[:, :width]  # kept slots first, in order
    keys, values = cache.stored()
    new_k = mx.take_along_axis(keys[0], order[..., None], axis=1)[None]
    new_v = mx.take_along_axis(values[0], order[..., None], axis=1)[None]
    valid = mx.arange(width)[None] < counts[:, None]
    positions = mx.where(valid, mx.take_along_axis(cache.positions, order, axis=1), -1)
    cache.replace(new_k, new_v, valid, positions)


# --- the block-wise prefill -------------------------------------------------------------------

def _inner(model: nn.Module) -> nn.Module:
    """The model without its head (logits are not needed while building a memory)."""
    return getattr(model, arch_of(model).inner_attr)


def _compressed(cache: list) -> list[tuple[int, CompressedKVCache]]:
    return [(i, c) for i, c in enumerate(cache) if isinstance(c, CompressedKVCache)]


def score_layers(model: nn.Module, cache: list, scorer: Scorer, window_queries: dict | None = None) -> dict:
    """Scores ``{layer: [H, S]}`` of every compressed layer's entries under ``scorer``."""
    attns = attention_modules(model)
    layers = _compressed(cache)
    if isinstance(scorer, RecencyScorer):
        return {i: recency_scores(c.positions, c.valid_mask(), scorer.sinks) for i, c in layers}
    if isinstance(scorer, WindowScorer):
        assert window_queries is not None
        queries = window_queries
    elif isinstance(scorer, PromptScorer):
        queries = prompt_queries(model, cache, scorer.tokens)
    else:
        raise KVPError(f"unknown scorer {scorer!r}")
    out = {}
    for i, c in layers:
        q, q_pos = queries[i]
        keys, _ = c.stored()
        out[i] = attention_scores(q, q_pos, keys, c.positions, c.valid_mask(), float(attns[i].scale))
    return out


def prompt_queries(model: nn.Module, cache: list, tokens: Sequence[int]) -> dict:
    """Run a patched prompt after what ``cache`` holds (its K/V are dropped afterwards); return
    ``{layer: (queries [1, Hq, P, D], positions [P])}`` of the compressed layers."""
    if not tokens:
        raise KVPError("the scoring prompt is empty")
    layers = _compressed(cache)
    run = [c if isinstance(c, CompressedKVCache) else copy_cache([c])[0] for c in cache]
    for _, c in layers:
        c.query_sink, c.query_last = [], None
    start = layers[0][1].offset if layers else 0
    try:
        _inner(model)(mx.array([list(tokens)], dtype=mx.int32), cache=run)
        queries = {i: c.query_sink[0] for i, c in layers if c.query_sink}
        mx.eval(queries)
    finally:
        for _, c in layers:
            c.query_sink = None
            c.trim(len(tokens))  # drop the prompt's own K/V
    positions = mx.arange(start, start + len(tokens))
    return {i: (q, positions) for i, q in queries.items()}


@dataclass
class _Track:
    peak_slots: int = 0
    peak_bytes: int = 0
    blocks: int = 0
    peak_entries: int = 0  # most valid entries per KV head (a layer's over its heads, rounded up)
    extra: dict = field(default_factory=dict)

    def see(self, cache: list) -> None:
        self.peak_slots = max([self.peak_slots] + [int(c.length) for _, c in _compressed(cache)])
        per_head = [-(-c.kept_entries() // c.n_heads) for _, c in _compressed(cache)]
        self.peak_entries = max([self.peak_entries] + per_head)
        self.peak_bytes = max(self.peak_bytes, sum(int(c.nbytes) for c in cache))


def _forward_block(model: nn.Module, cache: list, block: mx.array, scorer: Scorer) -> dict | None:
    """Forward ``block`` [1, n] appending to ``cache``; SnapKV's window queries when asked."""
    layers = _compressed(cache)
    window = isinstance(scorer, WindowScorer)
    if window:
        assert isinstance(scorer, WindowScorer)
        for _, c in layers:
            c.query_sink, c.query_last = [], scorer.window
    start = layers[0][1].offset if layers else 0
    try:
        _inner(model)(block, cache=cache)
        mx.eval([c.state for c in cache])
        if not window:
            return None
        n = block.shape[1]
        w = min(n, scorer.window)  # type: ignore[union-attr]
        positions = mx.arange(start + n - w, start + n)
        return {i: (c.query_sink[0], positions) for i, c in layers if c.query_sink}
    finally:
        for _, c in layers:
            c.query_sink, c.query_last = None, None


def _evict_all(model: nn.Module, cache: list, scorer: Scorer, budgets: list[int], level: str,
               window_queries: dict | None) -> None:
    scores = score_layers(model, cache, scorer, window_queries)
    for i, c in _compressed(cache):
        keep = select(scores[i], c.valid_mask(), budgets[i], level)
        if bool(mx.all(keep)):
            c.compressed = c.length
            continue
        evict(c, keep)
    mx.eval([c.state for c in cache], [c.positions for c in cache if isinstance(c, CompressedKVCache)])


def build_memory(
    model: nn.Module,
    tokens: Sequence[int] | mx.array,
    budget: int | Sequence[int] | None,
    scorer: Scorer,
    *,
    block: int = 2048,
    level: str = "pair",
    aux: nn.Module | None = None,
    predictor: Any = None,
    dtype: mx.Dtype | None = None,
    aux_scorer: Scorer = None,
) -> Memory:
    """Block-wise prefill of ``tokens`` with eviction: a :class:`Memory` the model continues from.

    ``budget``: entries per KV head per layer (one int, or one per layer, e.g. from
    :func:`kvp_mlx.epicache.budgets.allocate`); None (or ``scorer=None``) keeps everything (full
    KV). ``aux`` + ``predictor`` (a KV Prediction pair): blocks are prefilled by the auxiliary and
    the predictor writes the base's K/V; the auxiliary's cache is evicted with ``aux_scorer`` (its
    own token ids for a prompt scorer; default ``scorer``) and uniform budgets of ``max(budget)``.
    """
    flat: Any = tokens.reshape(-1).tolist() if isinstance(tokens, mx.array) else tokens
    ids = [int(t) for t in flat]
    if not ids:
        raise KVPError("the history to compress is empty")
    if aux is not None and predictor is None:
        raise KVPError("a KV-Prediction-built memory needs the predictor with the auxiliary model")
    cache = make_compressed_cache(model)
    aux_cache = make_compressed_cache(aux) if aux is not None else None
    tic = time.perf_counter()
    track = extend_memory(model, cache, ids, budget, scorer, block=block, level=level, aux=aux,
                          aux_cache=aux_cache, predictor=predictor, dtype=dtype, aux_scorer=aux_scorer)
    return Memory(cache, len(ids), track.peak_slots, track.peak_bytes, time.perf_counter() - tic, track.blocks,
                  aux_cache)


def extend_memory(
    model: nn.Module,
    cache: list,
    tokens: Sequence[int],
    budget: int | Sequence[int] | None,
    scorer: Scorer,
    *,
    block: int = 2048,
    level: str = "pair",
    aux: nn.Module | None = None,
    aux_cache: list | None = None,
    predictor: Any = None,
    dtype: mx.Dtype | None = None,
    aux_scorer: Scorer = None,
) -> _Track:
    """The block-wise prefill itself: ``tokens`` forwarded onto ``cache`` (a compressed cache of
    :func:`make_compressed_cache`, continuing at its true position) in blocks of ``block``, each
    followed by scoring and eviction to ``budget``. :func:`build_memory` runs it on a fresh cache; a
    bounded conversation (:class:`kvp_mlx.epicache.memory.BoundedMemory`) on its live one."""
    ids = [int(t) for t in tokens]
    if block < 1:
        raise KVPError("the block size must be positive")
    if level not in LEVELS:
        raise KVPError(f"unknown eviction level '{level}' (choose from {', '.join(LEVELS)})")
    kvp = aux is not None
    if kvp and (predictor is None or aux_cache is None):
        raise KVPError("a KV-Prediction-built memory needs the predictor with the auxiliary model")
    if kvp and isinstance(scorer, WindowScorer):
        raise KVPError("SnapKV scores with the base's queries of each block, which a KV-Prediction-built "
                       "memory never computes: build it with the base")
    enable_compressed_caches(model)
    budgets = layer_budgets(budget, len(cache)) if budget is not None and scorer is not None else None
    aux_budgets = [max(budgets)] * len(aux_cache) if budgets is not None and aux_cache is not None else None
    origin = int(cache[0].offset) if cache else 0
    track = _Track()
    for start in range(0, len(ids), block):
        chunk = mx.array([ids[start : start + block]], dtype=mx.int32)
        if aux is not None and aux_cache is not None:
            _, keys, values, _ = prefill_capturing_raw_kv(aux, chunk, chunk.shape[1], cache=aux_cache)
            inject_raw_kv(model, predictor(keys, values), cache=cache, offset=origin + start, dtype=dtype,
                          prefill_step_size=chunk.shape[1])
            window = None
        else:
            window = _forward_block(model, cache, chunk, scorer)
        track.see(cache)
        track.blocks += 1
        if budgets is not None:
            _evict_all(model, cache, scorer, budgets, level, window)
            if aux is not None and aux_cache is not None and aux_budgets is not None:
                _evict_all(aux, aux_cache, aux_scorer if aux_scorer is not None else scorer, aux_budgets, level, None)
    return track


def compress_tail(model: nn.Module, cache: list, tail_tokens: Sequence[int], budget: int | Sequence[int],
                  scorer: Scorer, *, level: str = "pair") -> None:
    """Score and evict ``cache`` in place, as after a block of the block-wise prefill, when the
    block (``tail_tokens``: the tokens appended since the last eviction, the last of them the
    newest position the cache holds) was forwarded by someone else (a conversation's turns).

    SnapKV needs the block's own last queries: those last tokens are trimmed off the compressed
    layers and forwarded again at the same positions, which records them (and recomputes the same
    K/V); sliding-window layers take that pass on a copy trimmed the same way."""
    if scorer is None:
        return
    budgets = layer_budgets(budget, len(cache))
    window = None
    if isinstance(scorer, WindowScorer):
        n = min(scorer.window, len(tail_tokens))
        if n == 0:
            return
        run: list = []
        for c in cache:
            if isinstance(c, CompressedKVCache):
                if c.length - c.compressed < n:
                    raise KVPError("internal: fewer appended entries than the block to re-score")
                c.trim(n)
                run.append(c)
            else:
                twin = copy_cache([c])[0]
                if not twin.is_trimmable():
                    raise KVPError("snapkv cannot re-score a sliding-window layer that has wrapped around; "
                                   "use another --kv-policy with this model")
                twin.trim(n)
                run.append(twin)
        window = _forward_block(model, run, mx.array([list(tail_tokens)[-n:]], dtype=mx.int32), scorer)
    _evict_all(model, cache, scorer, budgets, level, window)
