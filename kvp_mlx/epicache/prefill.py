"""Block-wise prefill with eviction under a per-layer budget (EpiCache and its baselines).

The history is cut into blocks of ``block`` tokens. Each block is forwarded, appending to the
compressed caches; then the entries are scored and each layer keeps ``budget`` entries per KV head:
- ``pair``: one top-k per layer over all its KV heads together (``budget * n_kv_heads`` entries;
  heads end with different lengths, held padded with a mask);
- ``pair-uniform``: a top-k per head.
Peak KV memory is therefore ``budget + block`` entries per head and layer, whatever the history
length. Scores (recomputed from scratch every block) come from a :class:`Scorer`; an eviction policy
(:mod:`kvp_mlx.epicache.policies`) says which one. The built-in scorers:
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
from typing import Any, Protocol, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from kvp_mlx.adapters import attention_modules, inject_raw_kv, prefill_capturing_raw_kv
from kvp_mlx.architectures import epicache_architecture
from kvp_mlx.epicache.cache import CompressedKVCache, copy_cache, enable_compressed_caches
from kvp_mlx.epicache.scoring import compressed_layers, inner_model, prompt_queries, query_scores, recency_scores
from kvp_mlx.errors import KVPError

LEVELS = ("pair", "pair-uniform")


class Scorer(Protocol):
    """How the entries of a compressed cache are ranked after each block (the highest are kept)."""

    @property
    def block_queries(self) -> int:
        """How many of each block's last queries :meth:`score` reads (0: none). They are recorded
        while the block is forwarded, so a KV-Prediction-built memory (whose blocks the base never
        forwards) needs a scorer that reads none."""
        ...

    def score(self, model: nn.Module, cache: list, block_queries: dict | None) -> dict[int, mx.array]:
        """Scores ``{layer: [H, S]}`` of every compressed layer of ``cache`` (-inf where invalid).
        ``block_queries``: ``{layer: (queries [1, Hq, W, D], positions [W])}``, the block's last
        queries when :attr:`block_queries` asks for them, else None."""
        ...


@dataclass(frozen=True)
class PromptScorer:
    """Score by the attention of a patched prompt (token ids) run after each block."""

    tokens: tuple[int, ...]
    block_queries = 0

    def score(self, model: nn.Module, cache: list, block_queries: dict | None) -> dict[int, mx.array]:
        return query_scores(model, cache, prompt_queries(model, cache, self.tokens))


@dataclass(frozen=True)
class WindowScorer:
    """Score by the attention of the block's own last ``window`` queries (SnapKV)."""

    window: int = 64

    @property
    def block_queries(self) -> int:
        return self.window

    def score(self, model: nn.Module, cache: list, block_queries: dict | None) -> dict[int, mx.array]:
        if block_queries is None:
            raise KVPError("internal: the block's queries were not recorded for SnapKV")
        return query_scores(model, cache, block_queries)


@dataclass(frozen=True)
class RecencyScorer:
    """Keep the first ``sinks`` positions and the most recent ones (StreamingLLM)."""

    sinks: int = 4
    block_queries = 0

    def score(self, model: nn.Module, cache: list, block_queries: dict | None) -> dict[int, mx.array]:
        return {i: recency_scores(c.positions, c.valid_mask(), self.sinks) for i, c in compressed_layers(cache)}


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
    arch = epicache_architecture(model)
    enable_compressed_caches(model)
    out: list[Any] = []
    for attn, c in zip(attention_modules(model), make_prompt_cache(model)):
        if isinstance(c, RotatingKVCache):
            out.append(c)
        else:
            out.append(CompressedKVCache(arch.kv_heads(attn), arch.q_heads(attn)))
    return out


def layer_budgets(budget: int | Sequence[int], n_layers: int) -> list[int]:
    budgets = [int(budget)] * n_layers if isinstance(budget, int) else [int(b) for b in budget]
    if len(budgets) != n_layers:
        raise KVPError(f"got budgets for {len(budgets)} layers, the model has {n_layers}")
    if min(budgets) < 1:
        raise KVPError("the KV budget must be at least 1 entry per head")
    return budgets


# --- eviction ---------------------------------------------------------------------------------

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

@dataclass
class _Track:
    peak_slots: int = 0
    peak_bytes: int = 0
    blocks: int = 0
    peak_entries: int = 0  # most valid entries per KV head (a layer's over its heads, rounded up)
    extra: dict = field(default_factory=dict)

    def see(self, cache: list) -> None:
        self.peak_slots = max([self.peak_slots] + [int(c.length) for _, c in compressed_layers(cache)])
        per_head = [-(-c.kept_entries() // c.n_heads) for _, c in compressed_layers(cache)]
        self.peak_entries = max([self.peak_entries] + per_head)
        self.peak_bytes = max(self.peak_bytes, sum(int(c.nbytes) for c in cache))


def _forward_block(model: nn.Module, cache: list, block: mx.array, scorer: Scorer | None) -> dict | None:
    """Forward ``block`` [1, n] appending to ``cache``; the block's last queries when ``scorer``
    reads them (``{layer: (queries, positions)}``), else None."""
    layers = compressed_layers(cache)
    window = scorer.block_queries if scorer is not None else 0
    if window:
        for _, c in layers:
            c.query_sink, c.query_last = [], window
    start = layers[0][1].offset if layers else 0
    try:
        inner_model(model)(block, cache=cache)
        mx.eval([c.state for c in cache])
        if not window:
            return None
        n = block.shape[1]
        w = min(n, window)
        positions = mx.arange(start + n - w, start + n)
        return {i: (c.query_sink[0], positions) for i, c in layers if c.query_sink}
    finally:
        for _, c in layers:
            c.query_sink, c.query_last = None, None


def _evict_all(model: nn.Module, cache: list, scorer: Scorer, budgets: list[int], level: str,
               block_queries: dict | None) -> None:
    scores = scorer.score(model, cache, block_queries)
    for i, c in compressed_layers(cache):
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
    scorer: Scorer | None,
    *,
    block: int = 2048,
    level: str = "pair",
    aux: nn.Module | None = None,
    predictor: Any = None,
    dtype: mx.Dtype | None = None,
    aux_scorer: Scorer | None = None,
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
    scorer: Scorer | None,
    *,
    block: int = 2048,
    level: str = "pair",
    aux: nn.Module | None = None,
    aux_cache: list | None = None,
    predictor: Any = None,
    dtype: mx.Dtype | None = None,
    aux_scorer: Scorer | None = None,
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
    if kvp and scorer is not None and scorer.block_queries:
        raise KVPError("a scorer of each block's own queries (SnapKV) needs the base's queries, which a "
                       "KV-Prediction-built memory never computes: build it with the base")
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
            queries = None
        else:
            queries = _forward_block(model, cache, chunk, scorer)
        track.see(cache)
        track.blocks += 1
        if scorer is not None and budgets is not None:
            _evict_all(model, cache, scorer, budgets, level, queries)
            if aux is not None and aux_cache is not None and aux_budgets is not None:
                _evict_all(aux, aux_cache, aux_scorer if aux_scorer is not None else scorer, aux_budgets, level, None)
    return track


def compress_tail(model: nn.Module, cache: list, tail_tokens: Sequence[int], budget: int | Sequence[int],
                  scorer: Scorer | None, *, level: str = "pair") -> None:
    """Score and evict ``cache`` in place, as after a block of the block-wise prefill, when the
    block (``tail_tokens``: the tokens appended since the last eviction, the last of them the
    newest position the cache holds) was forwarded by someone else (a conversation's turns).

    A scorer of the block's own last queries (SnapKV): those last tokens are trimmed off the
    compressed layers and forwarded again at the same positions, which records them (and recomputes
    the same K/V); sliding-window layers take that pass on a copy trimmed the same way."""
    if scorer is None:
        return
    budgets = layer_budgets(budget, len(cache))
    queries = None
    if scorer.block_queries:
        n = min(scorer.block_queries, len(tail_tokens))
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
                    raise KVPError("a scorer of the block's own queries (snapkv) cannot re-score a sliding-window "
                                   "layer that has wrapped around; use another --kv-policy with this model")
                twin.trim(n)
                run.append(twin)
        queries = _forward_block(model, run, mx.array([list(tail_tokens)[-n:]], dtype=mx.int32), scorer)
    _evict_all(model, cache, scorer, budgets, level, queries)
