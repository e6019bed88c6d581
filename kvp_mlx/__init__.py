"""kvp-mlx: KV Prediction for a short time to first token on MLX.

Public API: :func:`load`, :func:`generate`, :func:`stream_generate`, :class:`KVPModel`
(``model.prefill(tokens, method=...)``), :class:`Session` (a conversation), :class:`KVPError`.
"""

from kvp_mlx._blas import load_optimized_blas as _load_optimized_blas

_load_optimized_blas()  # must precede the first `import mlx.core`

from kvp_mlx.errors import KVPError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["KVPError", "KVPModel", "Session", "generate", "load", "stream_generate"]

_LAZY = {
    "load": "kvp_mlx.model",
    "KVPModel": "kvp_mlx.model",
    "generate": "kvp_mlx.generation",
    "stream_generate": "kvp_mlx.generation",
    "Session": "kvp_mlx.conversation.session",
}


def __getattr__(name: str):
    # Import the model stack on first use so `kvp-mlx --help` stays fast.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvp_mlx' has no attribute {name!r}")
