"""Device, dtype policy and environment report (`kvp-mlx env`)."""

from __future__ import annotations

import os
import platform

import mlx.core as mx

from kvp_mlx import _blas
from kvp_mlx.errors import KVPError

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def gpu_available() -> bool:
    try:
        return bool(mx.is_available(mx.gpu))
    except Exception:
        return False


def set_device(name: str | None) -> str:
    """Select ``cpu`` or ``gpu`` (None: MLX's default). Returns the device in use."""
    if name == "gpu" and not gpu_available():
        raise KVPError("no GPU is available to MLX on this machine (use --device cpu)")
    if name in ("cpu", "gpu"):
        mx.set_default_device(mx.cpu if name == "cpu" else mx.gpu)
    elif name is not None:
        raise KVPError(f"unknown device '{name}' (cpu or gpu)")
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def default_dtype() -> mx.Dtype:
    """float32 on the CPU (fp16/bf16 matmuls never use BLAS there); float16 on a GPU."""
    return mx.float16 if mx.default_device() == mx.gpu else mx.float32


def resolve_dtype(name: str | None) -> mx.Dtype:
    if name is None:
        return default_dtype()
    if name not in DTYPES:
        raise KVPError(f"unknown dtype '{name}' (one of {', '.join(DTYPES)})")
    return DTYPES[name]


def dtype_name(dtype: mx.Dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def blas_in_use() -> str:
    if platform.system() == "Darwin":
        return "Accelerate (macOS)"
    if _blas.loaded_blas:
        return f"OpenBLAS ({_blas.loaded_blas})"
    return f"reference BLAS bundled with mlx-cpu (slow: {_blas.blas_problem})"


def env_report() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return {
        "kvp-mlx": ver("kvp-mlx"),
        "mlx": mx.__version__,  # type: ignore[attr-defined]  # missing from mlx's stubs
        "mlx-lm": ver("mlx-lm"),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu cores": str(os.cpu_count()),
        "device": device,
        "gpu available": "yes" if gpu_available() else "no",
        "blas": blas_in_use(),
        "dtype policy": f"{dtype_name(default_dtype())} on {device} "
        "(float32 on cpu, float16 on gpu; override with --dtype)",
    }
