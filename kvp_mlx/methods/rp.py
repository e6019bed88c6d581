"""`rp`: random token pruning, the KV Prediction paper's weakest baseline.

A random fraction ``keep`` of the prompt's tokens (the last one always) is processed by every
layer; the others are dropped before layer 0 and never computed. Kept tokens keep their original
positions. Decoding attends to the kept prompt tokens and every generated token (no revival).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from kvp_mlx.layerwise import check_layerwise_support
from kvp_mlx.methods.interface import Capabilities, Option, PrefillMethod, PrefillModel, PrefillResult, register
from kvp_mlx.methods.pruning import LazyDecoder, LazyKVCache, StepPlan, forward_step, pruned_cost
from kvp_mlx.methods.lazy_schedule import keep_count


def random_kept_positions(prompt_len: int, keep: float, seed: int = 0) -> np.ndarray:
    """Sorted positions of the ``keep_count(keep, prompt_len)`` kept tokens, the last included."""
    n = keep_count(keep, prompt_len)
    rng = np.random.default_rng(seed)
    others = rng.choice(prompt_len - 1, size=n - 1, replace=False) if n > 1 else np.zeros(0, np.int64)
    return np.sort(np.append(others, prompt_len - 1)).astype(np.int64)


def _decode_plan(caches: list[LazyKVCache], n_new: int) -> StepPlan:
    total = caches[0].length + n_new
    active = np.concatenate([caches[0].positions, np.arange(caches[0].length, total)])
    return StepPlan(np.sort(active), [total] * len(caches))


def prefill_rp(model: PrefillModel, tokens: mx.array, prefill_step_size: int = 2048, keep: float = 0.5,
               prune_seed: int = 0) -> PrefillResult:
    lm = model.base
    check_layerwise_support(lm)
    T = tokens.shape[1]
    caches = [LazyKVCache() for _ in lm.layers]
    plan = StepPlan(random_kept_positions(T, keep, prune_seed), [T] * len(lm.layers))
    logits, computed = forward_step(lm, caches, tokens, plan, prefill_step_size)
    info = {"tokens_per_layer": computed, "keep": keep}
    return PrefillResult(caches, logits[:, -1, :], LazyDecoder(lm, _decode_plan, "rp"), "rp", info)


register(PrefillMethod(
    name="rp",
    summary="random token pruning, the paper's weakest baseline (base model, B=1)",
    prefill=prefill_rp,
    options=(
        Option("keep", float, 0.5, "fraction of prompt tokens kept",
               check=lambda v: None if 0 < v <= 1 else f"must lie in (0, 1], got {v}"),
        Option("prune_seed", int, 0, "seed of the random choice of kept tokens", flag="--rp-seed"),
    ),
    capabilities=Capabilities(batch=False),
    cost=pruned_cost,
))
