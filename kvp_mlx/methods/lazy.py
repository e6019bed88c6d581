"""`lazy`: LazyLLM (Fu et al., arXiv 2407.14057), training-free dynamic token pruning.

At a pruning layer, every token present gets a score, the attention the sequence's last token
gives it averaged over heads; only the top fraction (the schedule's keep rate, see
lazy_schedule.py) enters the next layer. A pruned token skips every later layer of that step,
so the last token's later layers attend to fewer keys. Its hidden state at the layer it skipped
goes to that layer's Aux Cache; at a later decoding step, if the new token's attention selects it
again, it is revived: computed from that stored state at that layer (never again from layer 0).
Each token is computed at most once per layer. Tokens keep their original positions for RoPE.

The engine (kvp_mlx.methods.pruning) runs both phases: the prefill is a step whose new tokens are
the whole prompt, a decoding step is a step with one new token.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from kvp_mlx.layerwise import check_layerwise_support
from kvp_mlx.methods.interface import Capabilities, Option, PrefillMethod, PrefillModel, PrefillResult, register
from kvp_mlx.methods.lazy_schedule import (  # noqa: F401  (lazy_tokens_per_layer: public)
    DEFAULT_SCHEDULE, PRESETS, LazySchedule, keep_count, lazy_tokens_per_layer, parse_schedule,
)
from kvp_mlx.methods.pruning import LazyDecoder, LazyKVCache, PlanFn, StepPlan, forward_step, pruned_cost


def lazy_plan(schedule: LazySchedule, n_layers: int) -> PlanFn:
    """Every token enters layer 0; the schedule's keep counts for the sequence's length after."""
    rates = schedule.keep_rates(n_layers)

    def plan(caches: list[LazyKVCache], n_new: int) -> StepPlan:
        total = caches[0].length + n_new
        return StepPlan(np.arange(total), [keep_count(r, total) for r in rates])

    return plan


def prefill_lazy(
    model: PrefillModel, tokens: mx.array, prefill_step_size: int = 2048,
    schedule: "str | LazySchedule" = DEFAULT_SCHEDULE,
) -> PrefillResult:
    lm = model.base
    check_layerwise_support(lm)
    sched = parse_schedule(schedule)
    rates = sched.keep_rates(len(lm.layers))
    plan = lazy_plan(sched, len(lm.layers))
    caches = [LazyKVCache() for _ in lm.layers]
    logits, computed = forward_step(lm, caches, tokens, plan(caches, tokens.shape[1]), prefill_step_size)
    info = {"tokens_per_layer": computed, "schedule": sched.name, "keep_rates": rates}
    return PrefillResult(caches, logits[:, -1, :], LazyDecoder(lm, plan, "lazy"), "lazy", info)


def _check_schedule(value: "str | LazySchedule") -> str | None:
    parse_schedule(value)  # raises a KVPError naming the presets
    return None


register(PrefillMethod(
    name="lazy",
    summary="LazyLLM token pruning; an Aux Cache revives pruned tokens while decoding (base model, B=1)",
    prefill=prefill_lazy,
    options=(Option("schedule", str, DEFAULT_SCHEDULE,
                    f"pruning schedule: a preset ({PRESETS[0]} ... {PRESETS[-1]}) or 'layer:keep,...'",
                    check=_check_schedule),),
    capabilities=Capabilities(batch=False),
    cost=pruned_cost,
))
