"""Prefill methods behind one interface.

A method takes the model and a prompt ``tokens`` [B, T] and returns a :class:`PrefillResult`:
the decoder's filled cache and the logits for the last prompt token. Decoding then continues
from the cache with ``result.decoder`` alone. Register a method with :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.errors import KVPError

if TYPE_CHECKING:
    from kvp_mlx.model import KVPModel


@dataclass
class PrefillResult:
    # One mlx-lm cache per decoder layer, holding all T prompt positions; None on a rank of a
    # distributed prefill (runahead) that does not decode.
    cache: list | None
    logits: mx.array | None  # [B, vocab]: the decoder's logits for the last prompt token (None: as cache)
    decoder: nn.Module  # the model that decodes from `cache` (the base, or the aux for `aux`)
    method: str
    info: dict  # method-specific facts (e.g. tokens computed per layer)


PrefillFn = Callable[..., PrefillResult]
_METHODS: dict[str, PrefillFn] = {}


def register(name: str) -> Callable[[PrefillFn], PrefillFn]:
    def wrap(fn: PrefillFn) -> PrefillFn:
        _METHODS[name] = fn
        return fn

    return wrap


def available_methods() -> list[str]:
    return sorted(_METHODS)


def as_token_batch(tokens: Any) -> mx.array:
    """Check and convert a prompt to int32 ``[B, T]``: 1-D becomes B=1; ragged or empty is refused."""
    if isinstance(tokens, (list, tuple)):
        if len(tokens) == 0:
            raise KVPError("empty prompt: no tokens to process")
        if isinstance(tokens[0], (list, tuple, mx.array)):
            lengths = {len(t) for t in tokens}
            if len(lengths) > 1:
                raise KVPError(
                    f"ragged batch (prompt lengths {sorted(lengths)}): prompts in one batch must have "
                    "equal length for now"
                )
        tokens = mx.array(tokens)
    if not isinstance(tokens, mx.array):
        raise KVPError(f"tokens must be an mx.array or a list of ids, got {type(tokens).__name__}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise KVPError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise KVPError("empty prompt: no tokens to process")
    if mx.issubdtype(tokens.dtype, mx.floating):
        raise KVPError("tokens must be integer ids")
    return tokens.astype(mx.int32)


def run_prefill(
    model: "KVPModel", tokens: Any, method: str, prefill_step_size: int = 2048, **options: Any
) -> PrefillResult:
    tokens = as_token_batch(tokens)
    if method not in _METHODS:
        raise KVPError(f"unknown prefill method '{method}' (available: {', '.join(available_methods())})")
    if prefill_step_size < 1:
        raise KVPError("prefill_step_size must be at least 1")
    vocab = model.base.args.vocab_size if hasattr(model.base, "args") else None
    if vocab is not None and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise KVPError(f"token ids must lie in [0, {vocab}) for this model")
    return _METHODS[method](model, tokens, prefill_step_size=prefill_step_size, **options)


# Import the built-in methods so they register themselves.
from kvp_mlx.methods import aux, base, kvp, lazy, rp  # noqa: E402,F401
from kvp_mlx.runahead import prefill as _runahead  # noqa: E402,F401
