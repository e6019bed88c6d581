"""`aux`: the auxiliary model alone prefills and decodes (the paper's "aux-only" baseline)."""

from __future__ import annotations

import mlx.core as mx

from kvp_mlx.methods import PrefillResult, register
from kvp_mlx.methods.base import plain_prefill
from kvp_mlx.methods.kvp import require_aux


@register("aux")
def prefill_aux(model, tokens: mx.array, prefill_step_size: int = 2048) -> PrefillResult:
    require_aux(model, "aux")
    cache, logits = plain_prefill(model.aux, tokens, prefill_step_size)
    return PrefillResult(cache, logits, model.aux, "aux", {})
