"""`kvp-mlx env`: MLX version, device, BLAS in use and the dtype policy."""

from __future__ import annotations

import argparse

HELP = "print the MLX version, device, BLAS in use and dtype policy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "gpu"], help="device to report on (default: MLX's)")


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.runtime_env import env_report, set_device

    set_device(args.device)
    report = env_report()
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return 0
