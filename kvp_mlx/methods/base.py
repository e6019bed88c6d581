"""`base`: plain prefill of the base model, the reference (what mlx-lm's generate_step does)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from kvp_mlx.methods import PrefillResult, register


def fill_cache(lm: nn.Module, tokens: mx.array, prefill_step_size: int) -> list:
    """A fresh cache holding ``tokens`` [B, T], filled in chunks (no logits are computed)."""
    cache = make_prompt_cache(lm)
    for start in range(0, tokens.shape[1], prefill_step_size):
        lm(tokens[:, start : start + prefill_step_size], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def plain_prefill(lm: nn.Module, tokens: mx.array, prefill_step_size: int) -> tuple[list, mx.array]:
    """All but the last token in chunks (cache only), then the last token: (cache, [B, vocab])."""
    cache = fill_cache(lm, tokens[:, :-1], prefill_step_size)
    logits = lm(tokens[:, -1:], cache=cache)[:, -1, :]
    return cache, logits


@register("base")
def prefill_base(model, tokens: mx.array, prefill_step_size: int = 2048) -> PrefillResult:
    cache, logits = plain_prefill(model.base, tokens, prefill_step_size)
    return PrefillResult(cache, logits, model.base, "base", {})
