"""`base`: plain prefill of the base model, the reference (what mlx-lm's generate_step does)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from kvp_mlx.adapters import counted_positions, held_positions  # noqa: F401  (held_positions: imported from here by sessions)
from kvp_mlx.errors import KVPError
from kvp_mlx.flops import model_shape, prefill_flops, prefill_scores
from kvp_mlx.methods.interface import (
    Capabilities, Cost, FilledCache, Pass, PrefillMethod, PrefillModel, PrefillResult, register,
)
from kvp_mlx.progress import ProgressFn


def fill_cache(lm: nn.Module, tokens: mx.array, prefill_step_size: int, max_kv_size: int | None = None,
               cache: list | None = None, progress: ProgressFn | None = None, held: int | None = None) -> list:
    """A cache holding ``tokens`` [B, T], filled in chunks (no logits are computed), as mlx-lm's
    ``generate_step`` fills it before the last prompt token. ``cache`` (holding a prefix of
    ``tokens``) is extended in place; else a fresh ``make_prompt_cache(lm, max_kv_size)`` is used.
    ``progress(processed, total)`` sees the positions computed so far of the ``total`` missing ones
    (as mlx-lm's ``prompt_progress_callback``: before the first chunk, then after each). ``held``:
    the positions ``cache`` holds where its layers count none (recurrent states only)."""
    cache = make_prompt_cache(lm, max_kv_size) if cache is None else cache
    counted = counted_positions(cache)
    done = counted if counted is not None else held if held is not None else held_positions(cache)
    if done > tokens.shape[1]:
        raise KVPError(f"the cache holds {done} positions, more than the {tokens.shape[1]} tokens given")
    total = tokens.shape[1] - done
    if progress is not None and total > 0:
        progress(0, total)
    for start in range(done, tokens.shape[1], prefill_step_size):
        lm(tokens[:, start : start + prefill_step_size], cache=cache)
        mx.eval([c.state for c in cache])
        if progress is not None:
            progress(min(start + prefill_step_size, tokens.shape[1]) - done, total)
    return cache


def plain_prefill(lm: nn.Module, tokens: mx.array, prefill_step_size: int) -> tuple[list, mx.array]:
    """All but the last token in chunks (cache only), then the last token: (cache, [B, vocab])."""
    cache = fill_cache(lm, tokens[:, :-1], prefill_step_size)
    logits = lm(tokens[:, -1:], cache=cache)[:, -1, :]
    return cache, logits


def prefill_base(model: PrefillModel, tokens: mx.array, prefill_step_size: int = 2048) -> PrefillResult:
    cache, logits = plain_prefill(model.base, tokens, prefill_step_size)
    return PrefillResult(cache, logits, model.base, "base", {})


def fill_base(model: PrefillModel, tokens: mx.array, prefill_step_size: int = 2048,
              max_kv_size: int | None = None, warm: FilledCache | None = None,
              progress: ProgressFn | None = None) -> FilledCache:
    cache = fill_cache(model.base, tokens, prefill_step_size, max_kv_size, warm.cache if warm else None, progress,
                       held=warm.positions if warm else None)
    return FilledCache(cache, model.base, positions=tokens.shape[1])


def plain_prefill_cost(lm: nn.Module, tokens: int, chunk: int, batch: int, role: str = "base") -> Cost:
    """A plain prefill of ``lm`` (the model in ``role``): a fill of T-1 positions and one step."""
    shape = model_shape(lm)
    return Cost(prefill_flops(shape, tokens, chunk, batch), prefill_scores(shape, tokens, chunk, batch),
                (Pass(role, "fill", tokens - 1), Pass(role, "step", offset=tokens - 1)))


register(PrefillMethod(
    name="base",
    summary="plain base prefill, the reference (what mlx-lm's generate_step does)",
    prefill=prefill_base,
    fill=fill_base,
    capabilities=Capabilities(extends_cache=True, progress=True, kv_access=False),
    cost=lambda model, tokens, chunk, batch, info: plain_prefill_cost(model.base, tokens, chunk, batch),
))
