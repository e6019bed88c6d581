"""Context-level load balancing for KV-Runahead: where to cut the prompt between the ranks.

Rank i owns prompt positions ``[bounds[i], bounds[i+1])``. Per layer its work is a linear term
(projections and MLP, per token) plus attention over the prefix and its own chunk (per
query-key pair): ``chunk_cost(a, b) = token_s*(b-a) + pair_s*sum_{t=a}^{b-1}(t+1)``, plus the
time to receive the prefix K/V (``a`` positions) from rank i-1. Early chunks attend over short
prefixes, so an equal-cost ("balanced") split gives them more tokens than an even split.

Ranks run as a per-layer pipeline: rank i starts layer l once it has finished layer l-1 and
received layer l's prefix from rank i-1, so the prefill time is a flow-shop makespan
(:func:`pipeline_time`), about ``sum_i s_i + (L-1) * max_i s_i`` for per-layer stage times s_i.

Splits are kept as a :class:`SplitTable` of fractions per (ranks, prompt length), built from a
cost model (analytic FLOPs, or measured on the target machine with :func:`measure_cost_model`)
and interpolated in log(prompt length) for unseen lengths (the paper's offline-search table).
"""

from __future__ import annotations

import bisect
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from kvp_mlx.errors import KVPError


@dataclass(frozen=True)
class CostModel:
    """Per-layer costs in seconds (of one rank) and the link between neighbouring ranks."""

    n_layers: int
    token_s: float  # per token: projections, MLP, norms
    pair_s: float  # per (query, key) pair: QK^T, softmax, AV
    layer_overhead_s: float = 0.0  # per layer call of a non-empty chunk
    kv_bytes_per_token: float = 0.0  # one layer's K and V for one position
    hidden_bytes_per_token: float = 0.0  # one position's hidden state (for the TSP model)
    link_bytes_per_s: float = math.inf
    link_latency_s: float = 0.0

    @classmethod
    def from_model(cls, lm: nn.Module, flops_per_s: float = 1e12, dtype_bytes: int = 4) -> "CostModel":
        """FLOP counts of an mlx-lm model at ``flops_per_s``, averaged over its layers."""
        from kvp_mlx.adapters import arch_of, attention_modules, kv_shapes

        layers, arch = lm.layers, arch_of(lm)
        # tree_flatten returns a list here (mlx annotates list | dict)
        weights = sum(v.size for layer in layers for _, v in tree_flatten(layer.parameters()) if v.ndim == 2)  # type: ignore[str-unpack, union-attr]
        heads_dims = [arch.q_heads(a) * s.head_dim for a, s in zip(attention_modules(lm), kv_shapes(lm))]
        kv = sum(2 * s.heads * s.head_dim for s in kv_shapes(lm)) / len(layers)
        return cls(
            n_layers=len(layers),
            token_s=2.0 * weights / len(layers) / flops_per_s,
            pair_s=4.0 * sum(heads_dims) / len(layers) / flops_per_s,
            kv_bytes_per_token=kv * dtype_bytes,
            hidden_bytes_per_token=hidden_size(lm) * dtype_bytes,
        )

    def with_link(self, bytes_per_s: float, latency_s: float = 0.0) -> "CostModel":
        return replace(self, link_bytes_per_s=bytes_per_s, link_latency_s=latency_s)

    def cumulative(self, b: float) -> float:
        """Compute cost of positions [0, b) as one chunk (without the per-call overhead)."""
        return self.token_s * b + self.pair_s * b * (b + 1) / 2

    def chunk_cost(self, a: int, b: int) -> float:
        if b <= a:
            return 0.0
        return self.cumulative(b) - self.cumulative(a) + self.layer_overhead_s

    def transfer_s(self, prefix: int) -> float:
        if prefix <= 0:
            return 0.0
        return self.link_latency_s + prefix * self.kv_bytes_per_token / self.link_bytes_per_s

    def stage_s(self, a: int, b: int) -> float:
        """One rank's time per layer: receive the prefix [0, a), then compute [a, b)."""
        return self.transfer_s(a) + self.chunk_cost(a, b)


def even_split(n_tokens: int, ranks: int) -> list[int]:
    """Bounds of equal chunks (the last rank always holds the last token)."""
    _check(n_tokens, ranks)
    return _fix([round(k * n_tokens / ranks) for k in range(ranks + 1)], n_tokens)


def balanced_split(n_tokens: int, ranks: int, cost: CostModel) -> list[int]:
    """Bounds that minimise the predicted pipeline time.

    Without link costs every rank gets the same compute per layer (closed form: the cumulative cost
    is quadratic). With a link, that split is refined by a coordinate search on
    :func:`pipeline_time` (later ranks receive longer prefixes, so the best cut moves).
    """
    _check(n_tokens, ranks)
    if ranks == 1:
        return [0, n_tokens]
    total = cost.cumulative(n_tokens)
    bounds = _fix([round(_inverse_cumulative(cost, k / ranks * total)) for k in range(ranks + 1)], n_tokens)
    if cost.link_latency_s == 0 and math.isinf(cost.link_bytes_per_s):
        return bounds
    best = pipeline_time(bounds, cost)
    step = max(1, n_tokens // (2 * ranks))
    while step >= 1:
        improved = False
        for i in range(1, ranks):
            for move in (-step, step):
                trial = list(bounds)
                trial[i] = min(max(trial[i] + move, trial[i - 1]), trial[i + 1])
                trial = _fix(trial, n_tokens)
                t = pipeline_time(trial, cost)
                if t < best - 1e-15:
                    bounds, best, improved = trial, t, True
        if not improved:
            step //= 2
    return bounds


def _inverse_cumulative(cost: CostModel, c: float) -> float:
    """The b with ``cost.cumulative(b) == c``."""
    if cost.pair_s == 0:
        return c / cost.token_s
    p, t = cost.pair_s / 2, cost.token_s + cost.pair_s / 2
    return (-t + math.sqrt(t * t + 4 * p * c)) / (2 * p)


def pipeline_time(bounds: Sequence[int], cost: CostModel) -> float:
    """Predicted prefill time of the per-layer pipeline over ``bounds`` (flow-shop makespan)."""
    finish = [0.0] * (len(bounds) - 1)  # per rank: when it finished the previous layer
    for _ in range(cost.n_layers):
        ready = 0.0  # when rank i-1 finished this layer
        for i in range(len(finish)):
            a, b = bounds[i], bounds[i + 1]
            if b > a or a > 0:  # empty first ranks do nothing; empty later ranks forward
                finish[i] = max(finish[i], ready) + cost.stage_s(a, b)
            ready = finish[i]
    return finish[-1]


def single_time(n_tokens: int, cost: CostModel) -> float:
    """One process prefilling the whole prompt."""
    return cost.n_layers * cost.chunk_cost(0, n_tokens)


def tsp_time(n_tokens: int, ranks: int, cost: CostModel) -> float:
    """Tensor + sequence parallelism (the paper's baseline): each layer's compute split ``ranks``
    ways, with two all-gathers and two reduce-scatters of the hidden states per layer (ring)."""
    if ranks == 1:
        return single_time(n_tokens, cost)
    moved = (ranks - 1) / ranks * n_tokens * cost.hidden_bytes_per_token
    collective = moved / cost.link_bytes_per_s + (ranks - 1) * cost.link_latency_s
    compute = cost.chunk_cost(0, n_tokens) - cost.layer_overhead_s
    return cost.n_layers * (compute / ranks + cost.layer_overhead_s + 4 * collective)


@dataclass
class SplitTable:
    """Split fractions per number of ranks, at a few prompt lengths; interpolated in between."""

    entries: dict[int, list[tuple[int, list[float]]]]  # ranks -> sorted (length, bounds / length)
    source: str = ""

    @classmethod
    def from_cost_model(
        cls, cost: CostModel, ranks: Sequence[int], lengths: Sequence[int], source: str = "cost model"
    ) -> "SplitTable":
        entries = {
            p: [(n, [b / n for b in balanced_split(n, p, cost)]) for n in sorted(lengths)] for p in ranks
        }
        return cls(entries, source)

    def split(self, n_tokens: int, ranks: int) -> list[int]:
        _check(n_tokens, ranks)
        rows = self.entries.get(ranks)
        if not rows:
            raise KVPError(f"the split table has no entry for {ranks} ranks (it has {sorted(self.entries)})")
        lengths = [n for n, _ in rows]
        j = bisect.bisect_left(lengths, n_tokens)
        if j == 0 or j == len(rows):
            fractions = rows[min(j, len(rows) - 1)][1]
        else:
            (n0, f0), (n1, f1) = rows[j - 1], rows[j]
            w = (math.log(n_tokens) - math.log(n0)) / (math.log(n1) - math.log(n0))
            fractions = [(1 - w) * x0 + w * x1 for x0, x1 in zip(f0, f1)]
        return _fix([round(f * n_tokens) for f in fractions], n_tokens)

    def save(self, path: str | Path) -> None:
        rows = {str(p): [{"tokens": n, "fractions": f} for n, f in r] for p, r in self.entries.items()}
        Path(path).write_text(json.dumps({"format": "kvp-mlx-split-table", "source": self.source,
                                          "ranks": rows}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "SplitTable":
        try:
            data = json.loads(Path(path).read_text())
            entries = {
                int(p): sorted((int(r["tokens"]), [float(x) for x in r["fractions"]]) for r in rows)
                for p, rows in data["ranks"].items()
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise KVPError(f"cannot read split table {path}: {e}") from None
        for p, rows in entries.items():
            if any(len(f) != p + 1 for _, f in rows):
                raise KVPError(f"split table {path}: entries for {p} ranks need {p + 1} fractions")
        return cls(entries, data.get("source", ""))


def measure_cost_model(
    lm: nn.Module,
    shapes: Sequence[tuple[int, int]] = ((64, 0), (256, 0), (64, 768), (192, 384)),
    repeats: int = 3,
    max_layers: int = 4,
) -> CostModel:
    """Fit token_s, pair_s and the per-layer overhead to timings of ``lm``'s decoder layers on this
    machine. Each (chunk, prefix) shape runs up to ``max_layers`` evenly spaced layers over a random
    chunk with a random prefix already in their caches; the fastest of ``repeats`` runs after a
    warm-up is used (the least disturbed by other load). Keep the shapes small: this runs in a few
    seconds for a 270M model."""
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.cache import KVCache

    from kvp_mlx.adapters import kv_shapes

    analytic = CostModel.from_model(lm)
    dtype = next(v.dtype for _, v in tree_flatten(lm.layers[0].parameters()))  # type: ignore[str-unpack, union-attr]  # a list
    dim = hidden_size(lm)
    picked = sorted({round(x) for x in np.linspace(0, len(lm.layers) - 1, min(max_layers, len(lm.layers)))})
    layers = [lm.layers[i] for i in picked]
    shapes_kv = [kv_shapes(lm)[i] for i in picked]
    rows, seconds = [], []
    for n, prefix in shapes:
        x = mx.random.normal((1, n, dim)).astype(dtype)
        prefix_kv = [mx.random.normal((1, s.heads, prefix, s.head_dim)).astype(dtype) for s in shapes_kv]
        mx.eval(x, prefix_kv)
        times = []
        for rep in range(repeats + 1):
            caches = [KVCache() for _ in layers]
            if prefix:
                for c, kv in zip(caches, prefix_kv):
                    c.state = (kv, kv, prefix)
            tic = time.perf_counter()
            for layer, c in zip(layers, caches):  # the same input for each: layers are independent here
                mx.eval(layer(x, create_attention_mask(x, c), cache=c))
            if rep:
                times.append(time.perf_counter() - tic)
        rows.append([n, n * prefix + n * (n + 1) / 2, 1.0])
        seconds.append(min(times) / len(layers))
    (token_s, pair_s, overhead_s), *_ = np.linalg.lstsq(np.array(rows), np.array(seconds), rcond=None)
    return replace(analytic, token_s=max(float(token_s), 1e-12), pair_s=max(float(pair_s), 0.0),
                   layer_overhead_s=max(float(overhead_s), 0.0))


def hidden_size(lm: nn.Module) -> int:
    """The model dimension: the input size of the first attention's key projection."""
    from kvp_mlx.adapters import arch_of, attention_modules
    from kvp_mlx.flops import _linear_dims

    attn = attention_modules(lm)[0]
    return _linear_dims(attn[arch_of(lm).raw_kv.projections()[0]])[0]


def _check(n_tokens: int, ranks: int) -> None:
    if ranks < 1:
        raise KVPError("need at least one rank")
    if n_tokens < 1:
        raise KVPError("empty prompt: no tokens to split")


def _fix(bounds: list[int], n_tokens: int) -> list[int]:
    """Clamp to [0, n], non-decreasing, first 0, last n, and the last rank never empty."""
    bounds = [min(max(int(b), 0), n_tokens) for b in bounds]
    bounds[0], bounds[-1] = 0, n_tokens
    for i in range(1, len(bounds)):
        bounds[i] = max(bounds[i], bounds[i - 1])
    if len(bounds) > 2:
        bounds[-2] = min(bounds[-2], n_tokens - 1)
    for i in range(len(bounds) - 3, 0, -1):
        bounds[i] = min(bounds[i], bounds[i + 1])
    return bounds
