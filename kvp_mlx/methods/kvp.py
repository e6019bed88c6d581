"""`kvp`: KV Prediction. The auxiliary model prefills all but the last token, the predictor maps its
raw K/V to the base's, the base cache is filled with them, and the base runs the last token."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from kvp_mlx.adapters import inject_raw_kv, prefill_capturing_raw_kv
from kvp_mlx.flops import kvp_flops, kvp_scores, model_shape
from kvp_mlx.errors import KVPError
from kvp_mlx.methods.base import held_positions
from kvp_mlx.methods.interface import Capabilities, Cost, FilledCache, Pass, PrefillMethod, PrefillModel, register
from kvp_mlx.progress import ProgressFn


def fill_kvp(model: PrefillModel, tokens: mx.array, prefill_step_size: int = 2048,
             max_kv_size: int | None = None, warm: FilledCache | None = None,
             progress: ProgressFn | None = None) -> FilledCache:
    """Base cache for ``tokens`` [B, n] predicted from the auxiliary model's prefill of them.

    Both caches are mlx-lm's own (``make_prompt_cache(..., max_kv_size)``), and the predicted K/V
    are written in ``prefill_step_size`` chunks: the base cache has the classes and sizes the base's
    own chunked prefill would leave (sliding-window layers included). The auxiliary's cache comes
    back too, as a free speculative-decoding draft.

    With ``warm`` (a conversation: the base cache holds ``tokens[:, :b]`` exactly or predicted, the
    auxiliary's ``tokens[:, :a]`` with a <= b), the auxiliary catches up on ``tokens[:, a:n]`` (the
    previous reply included: it needs it as context), the predictor maps only the positions the base
    lacks, ``b .. n-1``, and they are written at those positions.

    ``progress(processed, total)`` follows the auxiliary's prefill (``total = n - a`` positions),
    the bulk of the work.
    """
    assert model.aux is not None and model.predictor is not None  # Capabilities.needs_aux
    base_cache = warm.cache if warm is not None else make_prompt_cache(model.base, max_kv_size)
    aux_cache = warm.draft_cache if warm is not None and warm.draft_cache is not None else None
    aux_cache = make_prompt_cache(model.aux, max_kv_size) if aux_cache is None else aux_cache
    n, b, a = tokens.shape[1], held_positions(base_cache), held_positions(aux_cache)
    if not a <= b <= n:
        raise KVPError(f"cannot extend: the auxiliary holds {a} positions, the base {b}, of {n} tokens")
    if b == n:  # nothing to predict (a one-token prompt, or a cache that already holds the prefix)
        return FilledCache(base_cache, model.base, aux_cache)
    _, keys, values, _ = prefill_capturing_raw_kv(model.aux, tokens[:, a:n], prefill_step_size, cache=aux_cache,
                                                  progress=progress)
    if b > a:  # the base already holds these positions (the previous reply): keep the new ones only
        keys, values = [k[:, :, b - a :] for k in keys], [v[:, :, b - a :] for v in values]
    predicted = model.predictor(keys, values)
    inject_raw_kv(model.base, predicted, cache=base_cache, offset=b, dtype=model.dtype,
                  prefill_step_size=prefill_step_size)
    return FilledCache(base_cache, model.base, aux_cache, predicted=(b, n))


def predict_base_cache(
    model: PrefillModel, prefix: mx.array, prefill_step_size: int = 2048, *, max_kv_size: int | None = None
) -> list:
    """Base KV cache for ``prefix`` [B, T-1], predicted from the auxiliary model's prefill."""
    return fill_kvp(model, prefix, prefill_step_size, max_kv_size).cache


def kvp_cost(model: PrefillModel, tokens: int, chunk: int, batch: int, info: dict) -> Cost:
    assert model.aux is not None and model.predictor is not None  # Capabilities.needs_aux
    base, aux = model_shape(model.base), model_shape(model.aux)
    flops = kvp_flops(base, aux, model.predictor, tokens, chunk, batch)
    passes: tuple[Pass, ...] = (Pass("aux", "fill", tokens - 1),) if tokens > 1 else ()
    passes += (Pass("base", "step", offset=tokens - 1),)
    return Cost(flops, kvp_scores(base, aux, tokens, chunk, batch), passes)


register(PrefillMethod(
    name="kvp",
    summary="KV Prediction: auxiliary prefill of tokens[:-1] -> predictor -> base cache -> one base step",
    fill=fill_kvp,
    capabilities=Capabilities(needs_aux=True, extends_cache=True, progress=True),
    cost=kvp_cost,
))
