"""Sampling and logits processing, checked, then built by mlx-lm (``make_sampler``,
``make_logits_processors``): the same parameters, names and defaults as mlx-lm's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from kvp_mlx.errors import KVPError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class SamplingOptions:
    """mlx-lm's sampling and logits-processing parameters (``mlx_lm.generate``'s defaults)."""

    temp: float = 0.0
    top_p: float = 0.0  # 0: off (as mlx-lm)
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    top_k: int = 0  # 0: off
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    presence_penalty: float | None = None
    presence_context_size: int = 20
    frequency_penalty: float | None = None
    frequency_context_size: int = 20
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def check(self, vocab_size: int | None = None) -> None:
        """One-line errors for values mlx-lm would crash on or silently misuse."""
        def finite(name: str, value: float) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise KVPError(f"{name} must be a finite number, got {value!r}")

        finite("temp", self.temp)
        if self.temp < 0:
            raise KVPError(f"temp must be >= 0 (0 is greedy), got {self.temp}")
        for name in ("top_p", "min_p", "xtc_probability", "xtc_threshold"):
            value = getattr(self, name)
            finite(name, value)
            if not 0 <= value <= 1:
                raise KVPError(f"{name} must lie in [0, 1], got {value}")
        for name in ("top_k", "min_tokens_to_keep", "repetition_context_size", "presence_context_size",
                     "frequency_context_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise KVPError(f"{name} must be an integer, got {value!r}")
        if self.top_k < 0:
            raise KVPError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
        if self.min_tokens_to_keep < 1:
            raise KVPError(f"min_tokens_to_keep must be at least 1, got {self.min_tokens_to_keep}")
        for name in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
            if getattr(self, name) < 1:
                raise KVPError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.repetition_penalty is not None:
            finite("repetition_penalty", self.repetition_penalty)
            if self.repetition_penalty <= 0:
                raise KVPError(f"repetition_penalty must be positive (1 is off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) is not None:
                finite(name, getattr(self, name))
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0 or (
                vocab_size is not None and token >= vocab_size
            ):
                raise KVPError(f"logit_bias: token id {token!r} is not in [0, {vocab_size})")
            finite(f"logit_bias[{token}]", bias)

    def sampler(self, special_tokens: list[int]) -> Sampler:
        return make_sampler(
            self.temp, self.top_p, self.min_p, self.min_tokens_to_keep, top_k=self.top_k,
            xtc_probability=self.xtc_probability, xtc_threshold=self.xtc_threshold,
            xtc_special_tokens=special_tokens,
        )

    def logits_processors(self) -> list[LogitsProcessor]:
        return make_logits_processors(
            self.logit_bias or None, self.repetition_penalty, self.repetition_context_size,
            self.presence_penalty, self.presence_context_size, self.frequency_penalty,
            self.frequency_context_size,
        )


def sampling_options(**kwargs: Any) -> SamplingOptions:
    """:class:`SamplingOptions` from keyword arguments; an unknown name is a one-line error."""
    known = set(SamplingOptions.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise KVPError(f"unknown generation option(s) {', '.join(unknown)}")
    return SamplingOptions(**kwargs)


def with_history(processors: list[LogitsProcessor], history: mx.array) -> list[LogitsProcessor]:
    """Processors that see ``history`` (the prompt tokens already in the cache) before the tokens
    mlx-lm's loop passes them, so penalties count the whole prompt as ``mlx_lm.generate`` does."""
    if history.size == 0:
        return processors

    def wrap(p: LogitsProcessor) -> LogitsProcessor:
        return lambda tokens, logits: p(mx.concatenate([history, tokens]), logits)

    return [wrap(p) for p in processors]
