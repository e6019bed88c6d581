"""`aux`: the auxiliary model alone prefills and decodes (the paper's "aux-only" baseline)."""

from __future__ import annotations

import mlx.core as mx

from kvp_mlx.methods.base import fill_cache, plain_prefill_cost
from kvp_mlx.methods.interface import Capabilities, Cost, FilledCache, PrefillMethod, PrefillModel, register
from kvp_mlx.progress import ProgressFn


def fill_aux(model: PrefillModel, tokens: mx.array, prefill_step_size: int = 2048,
             max_kv_size: int | None = None, warm: FilledCache | None = None,
             progress: ProgressFn | None = None) -> FilledCache:
    assert model.aux is not None  # Capabilities.needs_aux: checked by run_prefill
    cache = fill_cache(model.aux, tokens, prefill_step_size, max_kv_size, warm.cache if warm else None, progress)
    return FilledCache(cache, model.aux)


def aux_cost(model: PrefillModel, tokens: int, chunk: int, batch: int, info: dict) -> Cost:
    assert model.aux is not None  # Capabilities.needs_aux
    return plain_prefill_cost(model.aux, tokens, chunk, batch, role="aux")


register(PrefillMethod(
    name="aux",
    summary="the auxiliary model alone prefills and decodes (the paper's aux-only baseline)",
    fill=fill_aux,
    capabilities=Capabilities(needs_aux=True, decoder="aux", extends_cache=True, progress=True),
    cost=aux_cost,
))
