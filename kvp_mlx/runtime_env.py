"""Device, dtype policy and environment report (`kvp-mlx env`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from kvp_mlx import _blas
from kvp_mlx._blas import blas_threads, set_blas_threads  # noqa: F401  (public here)
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


def on_gpu() -> bool:
    """True when MLX computes on a GPU (the default device)."""
    return mx.default_device() == mx.gpu


def default_dtype(checkpoint: mx.Dtype | None = None) -> mx.Dtype:
    """The compute dtype when none is asked for.

    CPU: float32 (half types have no BLAS there and run 4-5x slower). GPU: the checkpoint's own
    dtype, as mlx-lm loads it (a bfloat16 model is never cast to float16, which would overflow);
    float16 when there is no checkpoint (random-weight benchmark models).
    """
    if not on_gpu():
        return mx.float32
    return checkpoint if checkpoint is not None else mx.float16


def resolve_dtype(name: str | None, checkpoint: mx.Dtype | None = None) -> mx.Dtype:
    """``name`` ("float32", "float16", "bfloat16") when given, else :func:`default_dtype`."""
    if name is None:
        return default_dtype(checkpoint)
    if name not in DTYPES:
        raise KVPError(f"unknown dtype '{name}' (one of {', '.join(DTYPES)})")
    return DTYPES[name]


def checkpoint_dtype(module: nn.Module) -> mx.Dtype | None:
    """The floating dtype holding most of ``module``'s parameters as loaded (None: no floats).

    Quantized layers count through their scales and biases (the dtype they were quantized from).
    """
    sizes: dict[mx.Dtype, int] = {}
    for _, value in tree_flatten(module.parameters()):  # type: ignore[str-unpack]  # a list (typed list | dict)
        assert isinstance(value, mx.array)
        if mx.issubdtype(value.dtype, mx.floating):
            sizes[value.dtype] = sizes.get(value.dtype, 0) + value.size
    return max(sizes, key=lambda d: sizes[d]) if sizes else None


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

    device = "gpu" if on_gpu() else "cpu"
    now = "the checkpoint's dtype" if on_gpu() else dtype_name(default_dtype())
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
        "dtype policy": f"{now} on {device} "
        "(float32 on cpu, the checkpoint's own dtype on gpu; override with --dtype)",
    }


# --matmul: a 1024x1024 float32 matmul with the optimized BLAS and with the wheel's reference BLAS,
# each in a fresh process (the BLAS is chosen at import time).
_MATMUL_SNIPPET = """
import json, time
import kvp_mlx, mlx.core as mx
from kvp_mlx import _blas
n = {n}
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
mx.eval(a, b)
for _ in range(3):
    mx.eval(a @ b)
times = []
for _ in range({reps}):
    t = time.perf_counter(); mx.eval(a @ b); times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({{"blas": _blas.loaded_blas or "reference", "median_s": times[len(times) // 2]}}))
"""


def time_matmul(reference_blas: bool, n: int = 1024, reps: int = 9) -> dict:
    """Median seconds and GFLOP/s of an n x n float32 matmul, optimized or reference BLAS."""
    env = dict(os.environ)
    if reference_blas:
        env["KVP_MLX_BLAS"] = "reference"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _MATMUL_SNIPPET.format(n=n, reps=reps)],
                         capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["gflops"] = 2 * n**3 / result["median_s"] / 1e9
    return result
