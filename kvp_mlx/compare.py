"""Two prefill methods on the same prompt, side by side (``kvp-mlx generate --compare``): time to
first token, prompt tokens/s, and where their greedy continuations first differ."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvp_mlx.generation import GenerationResponse, stream_generate
from kvp_mlx.model import KVPModel
from kvp_mlx.prompting import Prompt


@dataclass
class MethodRun:
    method: str
    text: str
    tokens: list[int]
    last: GenerationResponse  # the final response: TTFT, prompt tokens/s, generation tokens/s, memory


@dataclass
class Comparison:
    runs: list[MethodRun] = field(default_factory=list)

    @property
    def first_tokens_agree(self) -> bool:
        a, b = self.runs
        return a.tokens[:1] == b.tokens[:1]

    @property
    def diverge_at(self) -> int | None:
        """Index of the first generated token where the two continuations differ (None: identical)."""
        a, b = (r.tokens for r in self.runs)
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return i
        return None if len(a) == len(b) else min(len(a), len(b))

    @property
    def speedup(self) -> float:
        a, b = self.runs
        return a.last.ttft_s / b.last.ttft_s


def run_method(model: KVPModel, prompt: Prompt, method: str, **kwargs: Any) -> MethodRun:
    pieces, tokens, last = [], [], None
    for last in stream_generate(model, prompt, method=method, **kwargs):
        pieces.append(last.text)
        if last.finish_reason != "stop":
            tokens.append(last.token)
    assert last is not None
    return MethodRun(method, "".join(pieces), tokens, last)


def compare_methods(
    model: KVPModel, prompt: Prompt, method: str, *, method_options: dict | None = None, **kwargs: Any
) -> Comparison:
    """``base`` and ``method`` (``kvp`` when ``method`` is base) on ``prompt``, greedily, after one
    untimed warm-up of each. ``kwargs`` are :func:`stream_generate`'s (``temp`` is forced to 0)."""
    other = method if method != "base" else "kvp"
    kwargs = {**kwargs, "temp": 0.0}
    options = {"base": {}, other: method_options or {}}
    for m in ("base", other):  # warm-up: one-time set-up is not timed; the context is checked once
        run_method(model, prompt, m, **{**kwargs, "max_tokens": 1}, method_options=options[m],
                   context_warning=m == "base")
    kwargs["context_warning"] = False
    return Comparison([run_method(model, prompt, m, method_options=options[m], **kwargs) for m in ("base", other)])
