"""`kvp-mlx env`: MLX version, device, BLAS in use and the dtype policy (kvp_mlx.runtime_env)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "gpu"], help="device to report on (default: MLX's)")
    parser.add_argument("--matmul", action="store_true",
                        help="time a 1024x1024 float32 matmul with the optimized and the reference BLAS")


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.runtime_env import env_report, set_device, time_matmul

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
