"""Interleaved timing: every case runs once per repetition, in an order that rotates from one
repetition to the next, so all cases share the machine's state (load, caches, clock) alike.

A case's ``measure`` runs one sample and returns its TTFT in seconds (it starts its own clock, so
a case can time exactly its span, e.g. plain mlx-lm's time to its first yielded token).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx


@dataclass
class Case:
    label: str  # e.g. "base", "kvp[OpenELM-270M]", "mlx-lm"
    measure: Callable[[], float]  # one sample: seconds
    kind: str = "method"  # "method" (a prefill method), "anchor" (plain mlx-lm), "component"
    method: str = ""  # the prefill method's registered name (or "mlx-lm", or the component's name)
    aux: str | None = None  # the auxiliary model the case uses
    flops: int | None = None
    scores: int | None = None  # attention scores computed (one softmax exp each)
    # The method's declared cost given a run's info (fills flops/scores after the runs), if any.
    cost: Callable[[dict], Any] | None = None
    samples: list[float] = field(default_factory=list)
    skipped: str | None = None  # why it was dropped (it failed in its warm-up)

    def summary(self) -> dict:
        s = sorted(self.samples)
        if not s:
            return {"median_s": None, "min_s": None, "max_s": None, "iqr_s": None}
        q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
        return {"median_s": statistics.median(s), "min_s": s[0], "max_s": s[-1], "iqr_s": q[2] - q[0]}

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def interleaved_schedule(labels: list[str], warmup: int, repetitions: int) -> list[tuple[int, str]]:
    """(repetition, label) pairs in run order; warm-up repetitions are negative.

    Repetition r runs the labels rotated left by r, so no case is always first or always last.
    """
    n = len(labels)
    order = []
    for r in range(-warmup, repetitions):
        k = r % n if n else 0
        order += [(r, label) for label in labels[k:] + labels[:k]]
    return order


def run_interleaved(
    cases: list[Case],
    warmup: int,
    repetitions: int,
    log: Callable[[str], None] | None = None,
) -> list[Case]:
    """Fill each case's ``samples``; a case that raises in its warm-up is marked skipped."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    by_label = {c.label: c for c in cases}
    if len(by_label) != len(cases):
        raise ValueError("case labels must be unique")
    for rep, label in interleaved_schedule(list(by_label), max(warmup, 1), repetitions):
        case = by_label[label]
        if case.skipped:
            continue
        try:
            seconds = case.measure()
        except Exception as e:  # a method that cannot run here (needs setup, no batch support, ...)
            if rep >= 0:
                raise
            case.skipped = f"{type(e).__name__}: {e}"
            log(f"  skip {label}: {case.skipped}")
            continue
        finally:
            mx.clear_cache()  # every sample starts from the same allocator state
        if rep >= 0:
            case.samples.append(seconds)
        log(f"  {'warm-up' if rep < 0 else f'rep {rep + 1}/{repetitions}'} {label}: {seconds:.3f} s")
    return cases
