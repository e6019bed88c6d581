"""`aux`: the auxiliary model alone prefills and decodes (the paper's "aux-only" baseline)."""

from __future__ import annotations

import mlx.core as mx

from kvp_mlx.methods.base import plain_prefill, plain_prefill_cost
from kvp_mlx.methods.interface import Capabilities, Cost, PrefillMethod, PrefillModel, PrefillResult, register


def prefill_aux(model: PrefillModel, tokens: mx.array, prefill_step_size: int = 2048) -> PrefillResult:
    assert model.aux is not None  # Capabilities.needs_aux: checked by run_prefill
    cache, logits = plain_prefill(model.aux, tokens, prefill_step_size)
    return PrefillResult(cache, logits, model.aux, "aux", {})


def aux_cost(model: PrefillModel, tokens: int, chunk: int, batch: int, info: dict) -> Cost:
    assert model.aux is not None  # Capabilities.needs_aux
    return plain_prefill_cost(model.aux, tokens, chunk, batch)


register(PrefillMethod(
    name="aux",
    summary="the auxiliary model alone prefills and decodes (the paper's aux-only baseline)",
    prefill=prefill_aux,
    capabilities=Capabilities(needs_aux=True, decoder="aux"),
    cost=aux_cost,
))
