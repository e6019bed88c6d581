"""`kvp`: KV Prediction. The auxiliary model prefills all but the last token, the predictor maps its
raw K/V to the base's, the base cache is filled with them, and the base runs the last token."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from kvp_mlx.adapters import inject_raw_kv, prefill_capturing_raw_kv
from kvp_mlx.flops import kvp_flops, kvp_scores, model_shape
from kvp_mlx.methods.interface import Capabilities, Cost, FilledCache, PrefillMethod, PrefillModel, register


def fill_kvp(model: PrefillModel, tokens: mx.array, prefill_step_size: int = 2048,
             max_kv_size: int | None = None) -> FilledCache:
    """Base cache for ``tokens`` [B, n] predicted from the auxiliary model's prefill of them.

    Both caches are mlx-lm's own (``make_prompt_cache(..., max_kv_size)``), and the predicted K/V
    are written in ``prefill_step_size`` chunks: the base cache has the classes and sizes the base's
    own chunked prefill would leave (sliding-window layers included). The auxiliary's cache of the
    same tokens comes back too, as a free speculative-decoding draft.
    """
    assert model.aux is not None and model.predictor is not None  # Capabilities.needs_aux
    if tokens.shape[1] == 0:  # nothing to predict (a one-token prompt): the base step is the prefill
        return FilledCache(make_prompt_cache(model.base, max_kv_size), model.base,
                           make_prompt_cache(model.aux, max_kv_size))
    aux_cache, aux_keys, aux_values, _ = prefill_capturing_raw_kv(model.aux, tokens, prefill_step_size, max_kv_size)
    predicted = model.predictor(aux_keys, aux_values)
    cache = inject_raw_kv(
        model.base, predicted, dtype=model.dtype, prefill_step_size=prefill_step_size, max_kv_size=max_kv_size
    )
    return FilledCache(cache, model.base, aux_cache)


def predict_base_cache(
    model: PrefillModel, prefix: mx.array, prefill_step_size: int = 2048, *, max_kv_size: int | None = None
) -> list:
    """Base KV cache for ``prefix`` [B, T-1], predicted from the auxiliary model's prefill."""
    return fill_kvp(model, prefix, prefill_step_size, max_kv_size).cache


def kvp_cost(model: PrefillModel, tokens: int, chunk: int, batch: int, info: dict) -> Cost:
    assert model.aux is not None and model.predictor is not None  # Capabilities.needs_aux
    base, aux = model_shape(model.base), model_shape(model.aux)
    flops = kvp_flops(base, aux, model.predictor, tokens, chunk, batch)
    return Cost(flops, kvp_scores(base, aux, tokens, chunk, batch))


register(PrefillMethod(
    name="kvp",
    summary="KV Prediction: auxiliary prefill of tokens[:-1] -> predictor -> base cache -> one base step",
    fill=fill_kvp,
    capabilities=Capabilities(needs_aux=True),
    cost=kvp_cost,
))
