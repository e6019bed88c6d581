"""Prefill methods behind one interface (:mod:`kvp_mlx.methods.interface`).

A method takes the model and a prompt ``tokens`` [B, T] and returns a :class:`PrefillResult`: the
decoder's filled cache and the logits for the last prompt token; decoding then continues from the
cache with ``result.decoder`` alone. Each method module declares itself with :func:`register`.
"""

from kvp_mlx.methods.interface import (
    Capabilities, Cost, FilledCache, Option, Pass, PrefillMethod, PrefillModel, PrefillResult, PeerRankResult,
    as_token_batch,
    available_methods, get_method, method_specs, register, run_prefill, unregister,
)

__all__ = [
    "Capabilities", "Cost", "FilledCache", "Option", "Pass", "PrefillMethod", "PrefillModel", "PrefillResult",
    "PeerRankResult",
    "as_token_batch", "available_methods", "get_method", "method_specs", "register", "run_prefill", "unregister",
]

# The built-in methods register themselves on import.
from kvp_mlx.methods import aux, base, kvp, lazy, rp  # noqa: E402,F401
from kvp_mlx.runahead import prefill as _runahead  # noqa: E402,F401
