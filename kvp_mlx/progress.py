"""Progress of long work on standard error: a prefill bar, server log lines, a bar over items.

A prefill reports ``(processed, total)`` as mlx-lm's ``prompt_progress_callback`` does: ``(0, total)``
before its first chunk, then after every chunk, ending at ``(total, total)``; ``total`` counts the
positions this fill computes (a warm turn: the new ones only; ``kvp``: the auxiliary's prefill).
The callback reaches a method's fill as the generation keyword ``prompt_progress_callback``
(``stream_generate``, ``Session.stream_generate``) or the ``progress`` keyword of
``MethodCall.fill``; methods whose capabilities declare ``progress`` report, the others do not.

When a bar shows (:func:`prefill_bar`): standard error is a terminal, the command is not quiet,
and the prefill takes more than one chunk (``--prefill-step-size``, 2048 by default): the bar
appears when the first chunk is done and work remains, and clears itself when the prefill ends.
Nothing is ever written to standard output.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Callable, TextIO

ProgressFn = Callable[[int, int], None]  # (processed, total), as mlx-lm's prompt_progress_callback


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class PrefillBar:
    """A tqdm bar over a prefill's positions, created once a prefill outlasts its first chunk.

    One instance serves several prefills in a row (a chat's turns, ``--compare``'s two methods): a
    report that goes backwards or changes ``total`` starts a new bar.
    """

    def __init__(self, stream: TextIO, desc: str = "prefill") -> None:
        self.stream, self.desc = stream, desc
        self._bar: Any = None  # a tqdm bar while one shows

    def __call__(self, processed: int, total: int) -> None:
        bar = self._bar
        if bar is not None and (total != bar.total or processed < bar.n):
            self.close()  # a new prefill
        if processed >= total:
            self.close()
            return
        if self._bar is None:
            if processed == 0:  # before the first chunk: maybe a one-chunk prefill
                return
            tqdm = _tqdm()
            self._bar = tqdm(total=total, initial=processed, desc=self.desc, unit="tok", unit_scale=True,
                             file=self.stream, leave=False, dynamic_ncols=True)
        self._bar.update(processed - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def prefill_bar(quiet: bool = False, stream: TextIO | None = None, desc: str = "prefill") -> PrefillBar | None:
    """The callback that draws a prefill bar on ``stream`` (default: standard error), or None when
    ``quiet`` or when the stream is not a terminal (piped, redirected: no bar, no carriage returns)."""
    stream = sys.stderr if stream is None else stream
    if quiet or not is_terminal(stream):
        return None
    return PrefillBar(stream, desc)


class PrefillLog:
    """Log lines instead of a bar (the server): for a prefill longer than one chunk, a line each
    time another ``step`` of it is done or ``seconds`` have passed since the last line, and one at
    the end."""

    def __init__(self, log: logging.Logger, label: str = "prefill", step: float = 0.1,
                 seconds: float = 10.0) -> None:
        self.log, self.label, self.step, self.seconds = log, label, step, seconds
        self._start = self._last = 0.0
        self._next = step
        self._logged = False

    def __call__(self, processed: int, total: int) -> None:
        now = time.perf_counter()
        if processed == 0:
            self._start = self._last = now
            self._next, self._logged = self.step, False
            return
        if processed >= total:
            if self._logged:
                elapsed = now - self._start
                self.log.info("%s done: %d tokens in %.1f s (%.1f tokens/s)", self.label, total, elapsed,
                              total / max(elapsed, 1e-9))
            self._logged = False
            return
        fraction = processed / total
        if fraction >= self._next or now - self._last >= self.seconds:
            rate = processed / max(now - self._start, 1e-9)
            self.log.info("%s %d/%d tokens (%.0f%%), %.1f tokens/s", self.label, processed, total,
                          100 * fraction, rate)
            self._last, self._logged = now, True
            self._next = (math.floor(fraction / self.step) + 1) * self.step


class CountingBar:
    """A bar over items (questions, requests) on standard error when it is a terminal and not
    ``quiet``; :meth:`advance` prints an item's result line to standard output around the bar."""

    def __init__(self, total: int, desc: str, unit: str = "it", quiet: bool = False,
                 stream: TextIO | None = None) -> None:
        stream = sys.stderr if stream is None else stream
        self._bar: Any = None
        if not quiet and is_terminal(stream):
            tqdm = _tqdm()
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False)

    def advance(self, line: str | None = None) -> None:
        if line is not None:
            if self._bar is not None:
                with self._bar.external_write_mode():
                    print(line, flush=True)
            else:
                print(line, flush=True)
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _tqdm() -> Any:
    """tqdm's bar class, without its monitor thread (bars here are updated on every chunk; the thread
    would only outlive them and meet a signal at interpreter exit)."""
    from tqdm import tqdm

    tqdm.monitor_interval = 0
    return tqdm
