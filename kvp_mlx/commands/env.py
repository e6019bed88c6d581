"""`kvp-mlx env`: MLX version, device, BLAS in use and the dtype policy.

`--matmul` times a 1024x1024 float32 matmul with the optimized BLAS and with the wheel's bundled
reference BLAS, each in a fresh process (the BLAS is chosen at import time), side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HELP = "print the MLX version, device, BLAS in use and dtype policy"

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "gpu"], help="device to report on (default: MLX's)")
    parser.add_argument("--matmul", action="store_true",
                        help="time a 1024x1024 float32 matmul with the optimized and the reference BLAS")


def time_matmul(reference_blas: bool, n: int = 1024, reps: int = 9) -> dict:
    env = dict(os.environ)
    if reference_blas:
        env["KVP_MLX_BLAS"] = "reference"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _MATMUL_SNIPPET.format(n=n, reps=reps)],
                         capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["gflops"] = 2 * n**3 / result["median_s"] / 1e9
    return result


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.runtime_env import env_report, set_device

    set_device(args.device)
    report = env_report()
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    if args.matmul:
        fast, slow = time_matmul(False), time_matmul(True)
        for label, r in (("optimized", fast), ("reference", slow)):
            print(f"matmul 1024^2 fp32, {label:<9}  {r['median_s'] * 1000:8.2f} ms  {r['gflops']:7.1f} GFLOP/s  "
                  f"({r['blas']})")
        print(f"speedup from the optimized BLAS: {slow['median_s'] / fast['median_s']:.1f}x")
    return 0
