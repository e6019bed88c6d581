"""Prefill methods behind one interface (:mod:`kvp_mlx.methods.interface`), entered one way
(:mod:`kvp_mlx.methods.entry`).

A method takes the model and a prompt ``tokens`` [B, T] and returns a :class:`PrefillResult`: the
decoder's filled cache and the logits for the last prompt token; decoding then continues from the
cache with ``result.decoder`` alone. Each method module declares itself with :func:`register`;
callers reach a method through :func:`enter`, which checks the model, the options and each prompt.
"""

from kvp_mlx.methods.interface import (
    Capabilities, Cost, FilledCache, Option, Pass, PrefillMethod, PrefillModel, PrefillResult, PeerRankResult,
    as_token_batch, available_methods, get_method, method_specs, register, unregister,
)
from kvp_mlx.methods.entry import (
    MethodCall, default_method, enter, missing_models, run_prefill, session_methods,
)

__all__ = [
    "Capabilities", "Cost", "FilledCache", "MethodCall", "Option", "Pass", "PrefillMethod", "PrefillModel",
    "PrefillResult", "PeerRankResult", "as_token_batch", "available_methods", "default_method", "enter", "get_method",
    "method_specs", "missing_models", "register", "run_prefill", "session_methods", "unregister",
]

# The built-in methods register themselves on import.
from kvp_mlx.methods import aux, base, kvp, lazy, rp, runahead  # noqa: E402,F401
