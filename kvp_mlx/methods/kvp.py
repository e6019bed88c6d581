"""`kvp`: KV Prediction. The auxiliary model prefills all but the last token, the predictor maps its
raw K/V to the base's, the base cache is filled with them, and the base runs the last token."""

from __future__ import annotations

import mlx.core as mx

from kvp_mlx.adapters import inject_raw_kv, prefill_capturing_raw_kv
from kvp_mlx.flops import kvp_flops, kvp_scores, model_shape
from kvp_mlx.methods.base import prefill_base
from kvp_mlx.methods.interface import Capabilities, Cost, PrefillMethod, PrefillModel, PrefillResult, register


def predict_base_cache(
    model: PrefillModel, prefix: mx.array, prefill_step_size: int = 2048, *, max_kv_size: int | None = None
) -> list:
    """Base KV cache for ``prefix`` [B, T-1], predicted from the auxiliary model's prefill.

    Both caches are mlx-lm's own (``make_prompt_cache(..., max_kv_size)``), and the predicted
    K/V are written in ``prefill_step_size`` chunks: the result has the cache classes and sizes
    the base's own chunked prefill of ``prefix`` would leave (sliding-window layers included).
    """
    assert model.aux is not None and model.predictor is not None  # Capabilities.needs_aux
    _, aux_keys, aux_values, _ = prefill_capturing_raw_kv(model.aux, prefix, prefill_step_size, max_kv_size)
    predicted = model.predictor(aux_keys, aux_values)
    return inject_raw_kv(
        model.base, predicted, dtype=model.dtype, prefill_step_size=prefill_step_size, max_kv_size=max_kv_size
    )


def prefill_kvp(model: PrefillModel, tokens: mx.array, prefill_step_size: int = 2048) -> PrefillResult:
    if tokens.shape[1] == 1:  # nothing to predict: the base step alone is the whole prefill
        result = prefill_base(model, tokens, prefill_step_size)
        result.method = "kvp"
        return result
    cache = predict_base_cache(model, tokens[:, :-1], prefill_step_size)
    logits = model.base(tokens[:, -1:], cache=cache)[:, -1, :]
    return PrefillResult(cache, logits, model.base, "kvp", {})


def kvp_cost(model: PrefillModel, tokens: int, chunk: int, batch: int, info: dict) -> Cost:
    assert model.aux is not None and model.predictor is not None  # Capabilities.needs_aux
    base, aux = model_shape(model.base), model_shape(model.aux)
    flops = kvp_flops(base, aux, model.predictor, tokens, chunk, batch)
    return Cost(flops, kvp_scores(base, aux, tokens, chunk, batch))


register(PrefillMethod(
    name="kvp",
    summary="KV Prediction: auxiliary prefill of tokens[:-1] -> predictor -> base cache -> one base step",
    prefill=prefill_kvp,
    capabilities=Capabilities(needs_aux=True),
    cost=kvp_cost,
))
