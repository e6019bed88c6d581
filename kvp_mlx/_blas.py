"""Make MLX's CPU backend use an optimized BLAS on Linux.

The Linux `mlx-cpu` wheel links a reference BLAS (about 3 GFLOP/s for float32
matmul). Loading an optimized OpenBLAS into the global symbol scope *before*
`mlx.core` is imported makes MLX resolve `cblas_sgemm` and friends to it
(60-135 GFLOP/s on the project's machines). This module must run before the
first `import mlx.core`; `kvp_mlx/__init__.py` imports it first.

It also registers :func:`_quiesce_at_exit`, which keeps OpenBLAS's exit-time destructor from
hanging when MLX work is still running as the process exits (see the comment there).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import sys
import warnings

# Debian / Ubuntu packages `libopenblas0-pthread` and `libopenblas0-openmp`, then Fedora / Arch names.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

#: Path of the BLAS library loaded into the global scope, or None.
loaded_blas: str | None = None
#: Why no optimized BLAS is in use, when none is.
blas_problem: str | None = None


def _find_openblas() -> str | None:
    override = os.environ.get("KVP_MLX_BLAS")
    if override:
        return override
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def load_optimized_blas() -> str | None:
    """Load OpenBLAS globally (Linux only). Returns its path, or None with a one-time warning."""
    global loaded_blas, blas_problem
    if loaded_blas is not None or not sys.platform.startswith("linux"):
        return loaded_blas
    if os.environ.get("KVP_MLX_BLAS") == "reference":
        blas_problem = "disabled by KVP_MLX_BLAS=reference"
        return None
    if "mlx.core" in sys.modules:
        blas_problem = "mlx.core was imported before kvp_mlx; import kvp_mlx first"
    else:
        path = _find_openblas()
        if path is None:
            blas_problem = "no OpenBLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread)"
        else:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                loaded_blas = path
                # Registered before mlx.core and mlx_lm are imported, so it runs after their handlers.
                atexit.register(_quiesce_at_exit)
            except OSError as e:
                blas_problem = f"could not load {path}: {e}"
    if loaded_blas is None:
        warnings.warn(
            f"kvp_mlx: MLX will use its slow reference BLAS on the CPU ({blas_problem}); "
            "float32 matmuls will be about 30x slower.",
            RuntimeWarning,
            stacklevel=2,
        )
    return loaded_blas


def blas_threads() -> int | None:
    """OpenBLAS's current thread count (None without OpenBLAS)."""
    if loaded_blas is None:
        return None
    try:
        return int(ctypes.CDLL(loaded_blas).openblas_get_num_threads())
    except (OSError, AttributeError):
        return None


def set_blas_threads(n: int) -> bool:
    """Set OpenBLAS's thread count at run time (benchmarks sharing cores between ranks).

    Returns False where it cannot be changed (no OpenBLAS loaded, e.g. macOS Accelerate).
    """
    if loaded_blas is None:
        return False
    try:
        ctypes.CDLL(loaded_blas).openblas_set_num_threads(int(n))
    except (OSError, AttributeError):
        return False
    return True


def _quiesce_at_exit() -> None:
    """Let in-flight BLAS work finish, then stop OpenBLAS's pool taking new jobs (atexit, Python).

    MLX leaks its CPU stream threads at exit, so a queued op (mlx-lm async-evals one token ahead)
    can still be inside a threaded sgemm when OpenBLAS's destructor `gotoblas_quit` runs: its
    `blas_thread_shutdown_` posts -1 to a busy worker, which then overwrites it with 0 when its job
    ends, sleeps in pthread_cond_wait unsignalled, and the destructor's pthread_join waits forever.
    """
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        streams: list = [mx.cpu]  # the main thread's default CPU stream
        generate = sys.modules.get("mlx_lm.generate")
        if generate is not None and hasattr(generate, "generation_stream"):
            streams.append(generate.generation_stream)  # where kvp_mlx and mlx-lm generate
        for stream in streams:
            try:
                mx.synchronize(stream)
            except Exception:  # an op failed (its error was reported already) or no such stream
                pass
    # Work on streams we cannot reach (other threads') now runs in its caller, not the pool.
    set_blas_threads(1)
