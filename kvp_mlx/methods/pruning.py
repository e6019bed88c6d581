"""The token-pruning engine shared by ``lazy`` and ``rp``: per-layer caches of only the tokens
computed at each layer (with their positions and an Aux Cache of tokens that stopped before it),
one step function for prefill and decoding, and a decoder module mlx-lm's ``generate_step`` drives.

:func:`forward_step` adds tokens to a sequence layer by layer: a :class:`StepPlan` says which tokens
enter layer 0 and how many may enter each later layer (chosen by the last token's head-averaged
attention). A token that skips a layer leaves its hidden state in that layer's Aux Cache; a later
step that selects it again computes it from there (never again from layer 0). Each token is
computed at most once per layer; tokens keep their original positions for RoPE.
One prompt at a time (B=1): per-sequence pruning would make a batch ragged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

from kvp_mlx.errors import KVPError
from kvp_mlx.flops import model_shape, pruned_prefill_flops, pruned_prefill_scores
from kvp_mlx.methods.interface import Cost, Pass
from kvp_mlx.layerwise import (
    block_kv, check_layerwise_support, embed, final_logits, last_query_attention, run_block,
)


class LazyKVCache(KVCache):
    """One layer's cache: K/V (after norm and RoPE) of only the tokens computed at this layer, in
    the order they were computed, with their positions; and the layer's Aux Cache: the input
    hidden states of tokens whose computation stopped just before this layer."""

    def __init__(self):
        super().__init__()
        self.positions = np.zeros(0, np.int64)  # cache row -> token position
        self.aux_positions = np.zeros(0, np.int64)
        self.aux_hidden: mx.array | None = None  # [1, M, dim]
        self.length = 0  # tokens in the sequence so far (the same for every layer)
        self._row = np.zeros(0, np.int64)  # token position -> cache row, -1 if absent
        self._aux_row = np.zeros(0, np.int64)

    @staticmethod
    def _lookup(table: np.ndarray, positions: np.ndarray) -> np.ndarray:
        out = np.full(len(positions), -1, np.int64)
        inside = positions < len(table)
        out[inside] = table[positions[inside]]
        return out

    @staticmethod
    def _set(table: np.ndarray, positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        size = int(positions.max()) + 1
        if size > len(table):
            table = np.concatenate([table, np.full(size - len(table) + 256, -1, np.int64)])
        table[positions] = rows
        return table

    def rows_of(self, positions: np.ndarray) -> np.ndarray:
        """Cache rows of tokens at ``positions`` (-1 for tokens not computed at this layer)."""
        return self._lookup(self._row, positions)

    def append(self, keys: mx.array, values: mx.array, positions: np.ndarray) -> None:
        start = self.offset
        self.update_and_fetch(keys, values)
        self.positions = np.concatenate([self.positions, positions])
        self._row = self._set(self._row, positions, np.arange(start, self.offset))

    def rows(self, rows: np.ndarray | None) -> tuple[mx.array, mx.array]:
        """Keys and values of cache ``rows`` (all rows, in order, when None)."""
        assert self.keys is not None and self.values is not None, "rows() before append()"
        keys, values = self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        if rows is None:
            return keys, values
        idx = mx.array(rows, dtype=mx.int32)
        return mx.take(keys, idx, axis=2), mx.take(values, idx, axis=2)

    def store_aux(self, positions: np.ndarray, hidden: mx.array) -> None:
        start = len(self.aux_positions)
        self.aux_positions = np.concatenate([self.aux_positions, positions])
        self.aux_hidden = hidden if self.aux_hidden is None else mx.concatenate([self.aux_hidden, hidden], axis=1)
        self._aux_row = self._set(self._aux_row, positions, np.arange(start, start + len(positions)))

    def aux_states(self, positions: np.ndarray) -> mx.array:
        """Stored hidden states ``[1, n, dim]`` of tokens waiting at this layer."""
        rows = self._lookup(self._aux_row, positions)
        if (rows < 0).any():
            raise RuntimeError(f"tokens {positions[rows < 0].tolist()} have no Aux Cache entry at this layer")
        assert self.aux_hidden is not None  # rows were found, so states were stored
        return mx.take(self.aux_hidden, mx.array(rows, dtype=mx.int32), axis=1)


@dataclass
class StepPlan:
    """What one step computes: the tokens entering layer 0 and, per layer, how many may enter."""

    active: np.ndarray  # sorted positions entering layer 0 (must include every new token kept)
    keep: list[int]  # keep[j]: at most this many tokens enter layer j (by the last token's attention)


def _take(x: mx.array, mask: np.ndarray) -> mx.array:
    return mx.take(x, mx.array(np.flatnonzero(mask), dtype=mx.int32), axis=1)


def _select(active: np.ndarray, scores: np.ndarray, count: int, last: int) -> np.ndarray:
    """The ``count`` highest-scoring positions of ``active`` (the last token always), sorted."""
    scores = scores.astype(np.float64)
    scores[active == last] = np.inf
    top = np.argsort(-scores, kind="stable")[:count]
    return np.sort(active[top])


def _layer_inputs(cache: LazyKVCache, missing, run_pos, run_h) -> mx.array:
    """Inputs of the tokens to compute at a layer: from the previous layer of this step, or revived
    from this layer's Aux Cache."""
    if len(missing) == len(run_pos):
        return run_h  # nothing revived: run_pos == missing
    revived = missing[~np.isin(missing, run_pos)]
    pos = np.concatenate([run_pos, revived])
    h = mx.concatenate([run_h, cache.aux_states(revived)], axis=1) if len(run_pos) else cache.aux_states(revived)
    return mx.take(h, mx.array(np.argsort(pos, kind="stable"), dtype=mx.int32), axis=1)


def _compute_layer(layer, arch, cache: LazyKVCache, h_in, missing, active, step_size, want_scores, last_layer):
    """Run the block for the ``missing`` tokens (sorted), attending to the ``active`` tokens' keys.

    Returns their outputs and, when ``want_scores``, the last token's head-averaged attention
    over the active tokens (in ``active`` order). The last token is the last of ``missing``.
    In the ``last_layer`` only the last token's output is needed: the others just fill the cache.
    """
    # Prefill: the layer's cache will hold exactly the active tokens in position order, so a
    # causal mask over cache rows is causal over positions (mlx-lm's own chunked prefill).
    fresh = cache.offset == 0 and len(missing) == len(active)
    n_full = len(missing)
    if last_layer and len(missing) > 1:
        n_full = 1
        for start in range(0, len(missing) - 1, step_size):
            pos = missing[start : min(start + step_size, len(missing) - 1)]
            cache.append(*block_kv(layer, arch, h_in[:, start : start + len(pos)], pos), pos)
            mx.eval(cache.keys, cache.values)
        h_in, missing = h_in[:, -1:], missing[-1:]
    outs, scores = [], None
    for start in range(0, n_full, step_size):
        pos = missing[start : start + step_size]
        final = start + step_size >= n_full

        def attend(q, k, v, scale, pos=pos, final=final):  # binds this step's pos and final
            nonlocal scores
            cache.append(k, v, pos)
            if fresh:
                keys, values = cache.rows(None)
                mask: str | mx.array | None = "causal" if q.shape[2] > 1 else None
            else:
                rows = cache.rows_of(active)
                present = rows >= 0
                keys, values = cache.rows(rows[present])
                key_pos = active[present]
                mask = mx.array(key_pos[None, :] <= pos[:, None])[None, None]
                if len(pos) == 1 and present.all():
                    mask = None  # one query at the largest position sees every active key
            if final and want_scores:
                scores = last_query_attention(q[:, :, -1:, :], keys, scale)
            # mlx-lm annotates mask as an array; it also takes "causal"
            return scaled_dot_product_attention(q, keys, values, cache=None, scale=scale, mask=mask)  # type: ignore[arg-type]

        h = run_block(layer, arch, h_in[:, start : start + step_size], pos, attend)
        mx.eval(h, cache.keys, cache.values, scores if final and want_scores else [])
        outs.append(h)
    h_out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
    return h_out, (np.array(scores) if scores is not None else None)


def forward_step(
    lm: nn.Module, caches: list[LazyKVCache], tokens: mx.array, plan: StepPlan, step_size: int = 2048
) -> tuple[mx.array, list[int]]:
    """Add ``tokens`` [1, n] to the sequence: returns the last token's logits ``[1, 1, vocab]`` and
    the number of tokens computed at each layer."""
    arch = check_layerwise_support(lm)
    n_layers = len(lm.layers)
    n_new = tokens.shape[1]
    total = caches[0].length + n_new
    last = total - 1
    for c in caches:
        c.length = total
    run_pos = np.arange(total - n_new, total)  # tokens computed at the previous layer this step
    run_h = embed(lm, tokens)
    active = plan.active
    kept = np.isin(run_pos, active)
    if not kept.all():  # new tokens dropped before layer 0 (rp)
        run_pos, run_h = run_pos[kept], _take(run_h, kept)
    if last not in run_pos:
        raise KVPError("the last token of a step must be computed")
    computed = []
    for j, (layer, cache) in enumerate(zip(lm.layers, caches)):
        missing = active[cache.rows_of(active) < 0]
        h_in = _layer_inputs(cache, missing, run_pos, run_h)
        prune = j + 1 < n_layers and plan.keep[j + 1] < len(active)
        last_layer = j + 1 == n_layers
        run_h, scores = _compute_layer(layer, arch, cache, h_in, missing, active, step_size, prune, last_layer)
        run_pos = missing[-1:] if last_layer else missing
        computed.append(len(missing))
        if prune:
            active = _select(active, scores, plan.keep[j + 1], last)
            kept = np.isin(run_pos, active)
            if not kept.all():
                caches[j + 1].store_aux(run_pos[~kept], _take(run_h, ~kept))
                run_pos, run_h = run_pos[kept], _take(run_h, kept)
    h_last = run_h[:, -1:, :]  # the last token is the largest position computed
    return final_logits(lm, h_last), computed


# How a decoding step chooses its plan from the caches and the number of new tokens.
PlanFn = Callable[[list[LazyKVCache], int], StepPlan]


class LazyDecoder(nn.Module):
    """Decodes from a pruned cache like an mlx-lm model: ``decoder(inputs [1, n], cache)`` returns
    logits ``[1, n, vocab]``, each input token being one decoding step with the method's plan
    (so teacher forcing equals decoding those tokens one by one)."""

    def __init__(self, lm: nn.Module, plan: PlanFn, method: str):
        super().__init__()
        self.lm = lm
        self._plan = plan
        self._method = method
        # Tokens computed per layer by the latest step (a plain attribute, not part of the module tree).
        object.__setattr__(self, "last_tokens_per_layer", [])

    @property
    def layers(self):
        return self.lm.layers

    def __call__(self, inputs: mx.array, cache: list[LazyKVCache]) -> mx.array:
        if inputs.shape[0] != 1:
            raise KVPError(f"method '{self._method}' decodes one sequence at a time (B=1), got B={inputs.shape[0]}")
        steps = []
        for i in range(inputs.shape[1]):
            logits, computed = forward_step(self.lm, cache, inputs[:, i : i + 1], self._plan(cache, 1))
            steps.append(logits)
        object.__setattr__(self, "last_tokens_per_layer", computed)
        return steps[0] if len(steps) == 1 else mx.concatenate(steps, axis=1)


def pruned_cost(model, tokens: int, chunk: int, batch: int, info: dict) -> Cost | None:
    """FLOPs and attention scores of a pruned prefill, from what it computed (``info["tokens_per_layer"]``)."""
    kept = info.get("tokens_per_layer")
    shape = model_shape(model.base)
    if not kept or len(kept) != len(shape.layers):
        return None  # known only after a run
    return Cost(pruned_prefill_flops(shape, kept, chunk, batch), pruned_prefill_scores(shape, kept, chunk, batch),
                (Pass("base", "pruned", tokens_per_layer=tuple(kept)),))
