"""kvp-mlx: KV Prediction for a short time to first token on MLX."""

from kvp_mlx._blas import load_optimized_blas as _load_optimized_blas

_load_optimized_blas()  # must precede the first `import mlx.core`

__version__ = "0.1.0"
