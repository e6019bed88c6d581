"""`runahead`: KV-Runahead (Cho, Rastegari, Naik, ICML 2024): the prompt's prefill split across the
ranks of an ``mx.distributed`` group (ring backend: local processes or several Macs).

Rank i owns the contiguous chunk ``[bounds[i], bounds[i+1])`` of the prompt (split even, or
balanced by a cost model: :mod:`kvp_mlx.runahead.split`). The model runs through mlx-lm's own
``Model.__call__`` on the rank's chunk with each decoder layer temporarily wrapped; per layer the
wrapper

1. receives the prefix K/V (positions before the chunk, normed and roped as mlx-lm caches them)
   from rank i-1 and puts it into the layer's ``KVCache`` (so RoPE offsets and the causal mask
   with offset come out of mlx-lm unchanged),
2. runs the mlx-lm layer on the chunk (in ``prefill_step_size`` pieces),
3. sends the grown K/V (prefix + chunk) to rank i+1, point to point.

Each layer is evaluated before the next starts, so rank i+1 computes layer l while rank i is on
layer l+1: a per-layer pipeline. No all-gather of K/V happens anywhere.

The last rank ends with the full cache and the first token's logits; it decodes alone (it holds
the only full cache: decoding anywhere else would first move the whole cache, the biggest
message of the method). On the other ranks ``PrefillResult.cache`` and ``.logits`` are ``None``
(``info["decodes"]`` says which rank decodes): they return as soon as their last layer is sent,
so nothing is added to the last rank's time to first token and their cores are free. With
``share_logits=True`` every rank gets the first-token logits ``[B, vocab]`` (one all-sum of a row
per prompt, on the last rank's critical path, with the others waiting for it). With a group of one
process this is the ``base`` prefill.

Before the pipeline starts, one small all-sum checks that every rank has the same prompt, model
depth and split (mismatched ranks would otherwise exchange wrongly shaped K/V). A rank whose peer
exits gets a :class:`KVPError`; a peer that hangs is caught by the watchdog after ``timeout_s``
(:mod:`kvp_mlx.runahead.group`).

This module is the pipeline alone; the method's declaration (options, cost, the single-process
case) is :mod:`kvp_mlx.methods.runahead`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, make_prompt_cache

from kvp_mlx.adapters import kv_shapes, model_type_of, sliding_window_layers
from kvp_mlx.architectures import path_problem
from kvp_mlx.runahead.group import guarded
from kvp_mlx.errors import KVPError
from kvp_mlx.runahead.split import CostModel, SplitTable, balanced_split, even_split

SPLITS = ("balanced", "even")


@dataclass
class _Stage:
    """This rank's place in the pipeline."""

    group: mx.distributed.Group
    bounds: list[int]
    kv_dims: list[tuple[int, int]]  # per layer: (KV heads, key dim + value dim); keys and values
    # travel as one message, concatenated on the last axis (equal head dims in every supported arch)
    dtype: mx.Dtype
    step: int
    timeout_s: float

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def last(self) -> bool:
        return self.rank == self.group.size() - 1

    @property
    def prefix(self) -> int:  # positions received from the previous rank
        return self.bounds[self.rank]

    @property
    def end(self) -> int:  # positions sent to the next rank
        return self.bounds[self.rank + 1]

    def receive(self, layer: int, batch: int) -> mx.array | None:
        """Prefix K/V of ``layer`` as ``[B, H, prefix, Dk + Dv]`` (lazy), or None without a prefix."""
        if self.prefix == 0:
            return None
        heads, dims = self.kv_dims[layer]
        shape = (batch, heads, self.prefix, dims)
        return mx.distributed.recv(shape, self.dtype, self.rank - 1, group=self.group)

    def send(self, kv: mx.array) -> mx.array | None:
        if self.last or self.end == 0:
            return None
        return mx.distributed.send(kv, self.rank + 1, group=self.group)

    def evaluate(self, layer: int, arrays: list) -> None:
        """One layer's step; receives and sends make it block on the neighbours."""
        with guarded(f"runahead rank {self.rank}, layer {layer}", self.timeout_s):
            mx.eval([a for a in arrays if a is not None])


class _RunaheadLayer:
    """Stands in for one mlx-lm decoder layer: receive prefix K/V, run the layer on the chunk, send.

    Other attributes (e.g. llama's ``use_sliding``) are the wrapped layer's.
    """

    def __init__(self, inner: nn.Module, index: int, stage: _Stage, keep_last_only: bool):
        self.inner = inner
        self._index = index
        self._stage = stage
        self._keep_last_only = keep_last_only  # the last rank's last layer: the head needs one position

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, x: mx.array, mask=None, cache: KVCache | None = None) -> mx.array:
        assert cache is not None  # the model passes each layer its cache
        stage, index = self._stage, self._index
        received = stage.receive(index, x.shape[0])
        if received is not None:
            d = received.shape[-1] // 2
            cache.state = (received[..., :d], received[..., d:], stage.prefix)
        outputs = []
        for start in range(0, x.shape[1], stage.step):
            piece = x[:, start : start + stage.step]
            outputs.append(self.inner(piece, create_attention_mask(piece, cache), cache=cache))
            if start + stage.step < x.shape[1]:
                stage.evaluate(index, [outputs[-1], cache.keys, cache.values])
        out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=1)
        assert cache.keys is not None and cache.values is not None
        keys, values = cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]
        sent = stage.send(mx.concatenate([keys, values], axis=-1))
        stage.evaluate(index, [out, keys, values, sent])
        return out[:, -1:] if self._keep_last_only else out


@contextlib.contextmanager
def _pipelined_layers(lm: nn.Module, stage: _Stage) -> Iterator[None]:
    """Within the block, ``lm``'s decoder layers are wrapped (restored afterwards)."""
    layers = lm.layers  # mlx-lm models expose the list itself: items are replaced in place
    inner = list(layers)
    try:
        for i, layer in enumerate(inner):
            layers[i] = _RunaheadLayer(layer, i, stage, keep_last_only=stage.last and i == len(inner) - 1)
        yield
    finally:
        for i, layer in enumerate(inner):
            layers[i] = layer


def _forward_only(stage: _Stage, n_layers: int, batch: int) -> None:
    """A rank with an empty chunk passes each layer's prefix on unchanged."""
    for layer in range(n_layers):
        received = stage.receive(layer, batch)
        stage.evaluate(layer, [stage.send(received)] if received is not None else [])


def split_bounds(
    model, n_tokens: int, ranks: int, split: str = "balanced", split_table: str | Path | SplitTable | None = None
) -> list[int]:
    """Chunk bounds for ``ranks`` ranks: ``even``, or ``balanced`` by ``split_table`` when given,
    else by the analytic cost model of the base model's shape."""
    if split == "even":
        return even_split(n_tokens, ranks)
    if split != "balanced":
        raise KVPError(f"unknown runahead split '{split}' (one of {', '.join(SPLITS)})")
    if split_table is not None:
        table = split_table if isinstance(split_table, SplitTable) else SplitTable.load(split_table)
        return table.split(n_tokens, ranks)
    return balanced_split(n_tokens, ranks, CostModel.from_model(model.base))


def _agree_on_inputs(group: mx.distributed.Group, tokens: mx.array, n_layers: int, bounds: list[int],
                     timeout_s: float) -> None:
    """Every rank must hold the same prompt, model depth and split, or the receives would not match."""
    ids = tokens.astype(mx.int64)
    weights = mx.arange(1, ids.shape[1] + 1, dtype=mx.int64)
    checksums = [int(ids.sum()) % 1000003, int((ids * weights).sum()) % 1000003,
                 sum((i + 1) * b for i, b in enumerate(bounds)) % 1000003]
    facts = mx.array([ids.shape[0], ids.shape[1], n_layers, *checksums], dtype=mx.int32)
    with guarded(f"runahead rank {group.rank()}: checking that all ranks have the same prompt", timeout_s):
        total = mx.distributed.all_sum(facts, group=group)
        mx.eval(total)
    if not mx.array_equal(total, facts * group.size()).item():
        raise KVPError("the ranks disagree on the prompt, the model or the split (every rank must run the "
                       "same model on the same prompt, with the same split options)")


@dataclass
class RankPrefill:
    """What one rank of a pipelined prefill ends with."""

    cache: list | None  # the full cache on the decoding (last) rank; None elsewhere
    logits: mx.array | None  # [B, vocab] on the last rank, or on every rank with ``share_logits``
    info: dict  # rank, ranks, bounds, split, decodes

    @property
    def decodes(self) -> bool:
        return bool(self.info["decodes"])


def check_runahead(model: Any, split: str, timeout_s: float) -> None:
    """One-line errors for a split, a timeout or a model runahead cannot run."""
    if split not in SPLITS:
        raise KVPError(f"unknown runahead split '{split}' (one of {', '.join(SPLITS)})")
    if timeout_s <= 0:
        raise KVPError("the runahead timeout must be positive")
    problem = path_problem(model.base, "runahead")  # the registry entry's claim
    if problem:
        raise KVPError(problem)
    sliding = sliding_window_layers(model.base)
    if sliding:  # ranks pass whole prefixes on; a RotatingKVCache keeps only a window of them
        raise KVPError(f"runahead does not support sliding-window attention layers "
                       f"({model_type_of(model.base)} layers {', '.join(map(str, sliding))})")


def pipelined_prefill(model: Any, tokens: mx.array, prefill_step_size: int, split: str,
                      split_table: str | Path | SplitTable | None, timeout_s: float, group: mx.distributed.Group,
                      share_logits: bool = False) -> RankPrefill:
    """This rank's part of the prefill of ``tokens`` [B, T] over a group of two or more ranks."""
    lm = model.base
    ranks, rank = group.size(), group.rank()
    batch, n_tokens = tokens.shape
    bounds = split_bounds(model, n_tokens, ranks, split, split_table)
    _agree_on_inputs(group, tokens, len(lm.layers), bounds, timeout_s)
    stage = _Stage(
        group=group, bounds=bounds, kv_dims=[(s.heads, 2 * s.head_dim) for s in kv_shapes(lm)],
        dtype=model.dtype, step=prefill_step_size, timeout_s=timeout_s,
    )
    cache = make_prompt_cache(lm)
    own = tokens[:, bounds[rank] : bounds[rank + 1]]
    if own.shape[1] == 0:
        _forward_only(stage, len(lm.layers), batch)
        logits = None
    else:
        with _pipelined_layers(lm, stage):
            logits = lm(own, cache=cache)[:, -1, :]  # lazy: only the last rank evaluates it
    if stage.last:
        mx.eval(logits)
    elif not share_logits:
        logits = None
    if share_logits:
        if not stage.last:
            logits = mx.zeros((batch, lm.args.vocab_size), dtype=model.dtype)
        assert logits is not None  # the last rank computed them, the others hold zeros
        with guarded(f"runahead rank {rank}: sharing the first-token logits", timeout_s):
            logits = mx.distributed.all_sum(logits, group=group)  # one row per prompt, from the last rank
            mx.eval(logits)
    info = {"rank": rank, "ranks": ranks, "bounds": bounds, "split": split, "decodes": stage.last}
    return RankPrefill(cache if stage.last else None, logits, info)


def decoding_rank(group: mx.distributed.Group) -> int:
    """The rank that holds the full cache after a runahead prefill and decodes: the last one."""
    return group.size() - 1
