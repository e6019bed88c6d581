"""`runahead`: KV-Runahead, the prefill split across the ranks of an ``mx.distributed`` group.

The pipeline is :mod:`kvp_mlx.runahead.prefill`; this module declares the method. A group of one
process runs the ``base`` prefill. The last rank ends with the full cache and decodes; the other
ranks end with a :class:`PeerRankResult`.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from kvp_mlx.methods.base import plain_prefill_cost, prefill_base
from kvp_mlx.methods.interface import (
    Capabilities, Option, PeerRankResult, PrefillMethod, PrefillModel, PrefillResult, register,
)
from kvp_mlx.runahead.group import DEFAULT_TIMEOUT_S, join_group
from kvp_mlx.runahead.prefill import SPLITS, check_runahead, pipelined_prefill
from kvp_mlx.runahead.split import SplitTable


def prefill_runahead(
    model: PrefillModel,
    tokens: mx.array,
    prefill_step_size: int = 2048,
    split: str = "balanced",
    split_table: str | Path | SplitTable | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    group: mx.distributed.Group | None = None,
    share_logits: bool = False,
) -> PrefillResult | PeerRankResult:
    check_runahead(model, split, timeout_s)
    group = join_group(timeout_s) if group is None else group
    if group.size() == 1:
        result = prefill_base(model, tokens, prefill_step_size)
        result.method = "runahead"
        result.info = {"rank": 0, "ranks": 1, "bounds": [0, tokens.shape[1]], "decodes": True}
        return result
    rank = pipelined_prefill(model, tokens, prefill_step_size, split, split_table, timeout_s, group, share_logits)
    if not rank.decodes:
        return PeerRankResult("runahead", rank.logits, rank.info)
    assert rank.cache is not None and rank.logits is not None  # the last rank holds both
    return PrefillResult(rank.cache, rank.logits, model.base, "runahead", rank.info)


register(PrefillMethod(
    name="runahead",
    summary="KV-Runahead: the prefill split across the ranks of an mx.distributed group (exact; "
    "launch with mlx.launch); the last rank decodes",
    prefill=prefill_runahead,
    options=(
        Option("split", str, "balanced", "prompt split between ranks: balanced by a cost model, or even",
               choices=SPLITS),
        Option("split_table", str, None,
               "split table (JSON, from `python -m bench.runahead --save-table`) for the balanced split"),
        Option("timeout_s", float, DEFAULT_TIMEOUT_S,
               "give up with an error when a peer rank sends nothing for this many seconds",
               check=lambda v: None if v > 0 else "must be positive", flag="--runahead-timeout"),
        Option("share_logits", bool, False, "every rank gets the first-token logits (one all-sum)"),
        Option("group", mx.distributed.Group, None, "the process group (default: join the launched one)", cli=False),
    ),
    # The same work as a base prefill, split over the ranks.
    cost=lambda model, tokens, chunk, batch, info: plain_prefill_cost(model.base, tokens, chunk, batch),
    capabilities=Capabilities(architecture_path="runahead",
                              needs_launch="needs several processes (an mx.distributed ring); time it with "
                              "`python -m bench.runahead`"),
))
