"""LazyLLM pruning schedules: which fraction of the context's tokens enters each layer.

A schedule resolves, for a model of ``n`` layers, to keep rates ``r[0..n-1]`` (non-increasing,
``r[0] = 1``): ``r[j]`` is the fraction of the sequence's tokens that enter layer ``j``. Tokens
are chosen at the end of layer ``j-1`` by the last token's attention there (LazyLLM), so layer 0
always sees every token. For ``N`` tokens, ``keep_count(r[j], N) = max(1, ceil(r[j] * N))`` tokens
enter layer ``j``; dropping the rest is the same as dropping the scores below that percentile.

Progressive presets ``L{a}-{b}`` (the KV Prediction paper's LazyLLM baselines, pruning from 30%
to 90% of depth): with ``s = ceil(0.3 n)`` and ``e = floor(0.9 n)`` (clamped to ``[1, n-1]``),
``r[j] = 1`` for ``j < s``; ``r[j] = a + (b - a) (j - s) / (e - s)`` for ``s <= j <= e`` (pruning
at every one of those layers; ``b`` when ``s = e``); ``r[j] = b`` for ``j > e``. For OpenELM-1.1B
(28 layers): layers 0-8 see everything, layers 9..25 ramp from ``a`` down to ``b``, 26-27 keep ``b``.

Explicit schedules ``"j:r,j:r,..."`` set the keep rate from layer ``j`` on (``j >= 1``, layers
increasing, rates non-increasing), e.g. ``"8:0.5,16:0.25"``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kvp_mlx.errors import KVPError

PRESETS = (
    "L0.75-0.75", "L0.75-0.5", "L0.75-0.25", "L0.75-0.1", "L0.75-0.05", "L0.75-0.01",
    "L0.50-0.5", "L0.50-0.25", "L0.50-0.1", "L0.50-0.05", "L0.50-0.01",
)
DEFAULT_SCHEDULE = "L0.75-0.25"
START_DEPTH, END_DEPTH = 0.3, 0.9

_RAMP = re.compile(r"L(\d*\.?\d+)-(\d*\.?\d+)")


@dataclass(frozen=True)
class LazySchedule:
    name: str
    start_keep: float = 1.0  # progressive ramp: keep rate at START_DEPTH ...
    end_keep: float = 1.0  # ... and from END_DEPTH on
    points: tuple[tuple[int, float], ...] = ()  # explicit (layer, keep from that layer on); overrides the ramp

    def keep_rates(self, n_layers: int) -> list[float]:
        """The fraction of tokens entering each of ``n_layers`` layers."""
        if self.points:
            rates, current = [], 1.0
            points = dict(self.points)
            if max(points) >= n_layers:
                raise KVPError(f"schedule '{self.name}' prunes at layer {max(points)}, the model has {n_layers} layers")
            for j in range(n_layers):
                current = points.get(j, current)
                rates.append(current)
            return rates
        s = max(1, math.ceil(round(START_DEPTH * n_layers, 9)))
        e = min(n_layers - 1, math.floor(round(END_DEPTH * n_layers, 9)))
        rates = []
        for j in range(n_layers):
            if j < s or s > e:
                rates.append(1.0)
            elif j > e or s == e:
                rates.append(self.end_keep)
            else:
                ramp = self.start_keep + (self.end_keep - self.start_keep) * (j - s) / (e - s)
                rates.append(round(ramp, 12))
        return rates


def keep_count(rate: float, n_tokens: int) -> int:
    """Tokens kept out of ``n_tokens`` at keep rate ``rate`` (at least one: the last token)."""
    return max(1, math.ceil(round(rate * n_tokens, 6)))


def parse_schedule(spec: "str | LazySchedule") -> LazySchedule:
    """A schedule from a preset name (``L0.75-0.25``), any ``L{a}-{b}`` ramp, or ``"j:r,..."``."""
    if isinstance(spec, LazySchedule):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise KVPError(f"a lazy schedule is a string such as 'L0.75-0.25' or '8:0.5,16:0.25', got {spec!r}")
    text = spec.strip()
    m = _RAMP.fullmatch(text)
    if m:
        a, b = float(m.group(1)), float(m.group(2))
        if not (0 < b <= a <= 1):
            raise KVPError(f"schedule '{text}': need 0 < end keep <= start keep <= 1")
        return LazySchedule(text, a, b)
    points = []
    try:
        for part in text.split(","):
            layer, rate = part.split(":")
            points.append((int(layer), float(rate)))
    except ValueError:
        raise KVPError(
            f"unknown lazy schedule '{text}' (presets: {', '.join(PRESETS)}; "
            "or 'layer:keep,...' such as '8:0.5,16:0.25')"
        ) from None
    layers = [j for j, _ in points]
    rates = [r for _, r in points]
    if layers[0] < 1 or layers != sorted(set(layers)):
        raise KVPError(f"schedule '{text}': layers must be increasing and >= 1 (layer 0 sees every token)")
    if any(not 0 < r <= 1 for r in rates) or rates != sorted(rates, reverse=True):
        raise KVPError(f"schedule '{text}': keep rates must lie in (0, 1] and not increase with depth")
    return LazySchedule(text, points=tuple(points))


def lazy_tokens_per_layer(schedule: "str | LazySchedule", n_layers: int, prompt_len: int) -> list[int]:
    """Prompt tokens a ``lazy`` prefill computes at each layer (what ``info["tokens_per_layer"]`` reports)."""
    rates = parse_schedule(schedule).keep_rates(n_layers)
    return [keep_count(r, prompt_len) for r in rates]


def rp_tokens_per_layer(keep: float, n_layers: int, prompt_len: int) -> list[int]:
    """Prompt tokens an ``rp`` (random pruning) prefill computes at each layer."""
    return [keep_count(keep, prompt_len)] * n_layers
