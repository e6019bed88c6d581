"""A lab command's entry point: its parser from ``add_arguments``, then ``run`` with kvp-mlx's
one-line errors (``kvp_mlx.errors.exit_status``)."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

from kvp_mlx.errors import exit_status


def run_command(prog: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace], Any], argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return exit_status(lambda: run(args))
