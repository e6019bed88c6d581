"""The `kvp-mlx` command: one subcommand per module, user errors as one line without a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module exposing HELP (optional), add_arguments(parser), run(args) -> int
COMMANDS = {
    "generate": "kvp_mlx.commands.generate",
    "env": "kvp_mlx.commands.env",
    "train": "kvp_mlx.commands.train",
    "bench": "kvp_mlx.commands.bench",
    "convert": "kvp_mlx.convert.cli",
    "runahead-bench": "kvp_mlx.commands.runahead_bench",
    "chat": "kvp_mlx.commands.chat",
    "cache-prompt": "kvp_mlx.commands.cache_prompt",
    "conv-eval": "kvp_mlx.commands.conv_eval",
    "epicache-profile": "kvp_mlx.commands.epicache_profile",
    "serve": "kvp_mlx.commands.serve",
    "evaluate": "kvp_mlx.commands.evaluate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvp-mlx",
        description="KV Prediction on MLX: a small auxiliary model prefills the prompt, learned maps "
        "predict the base model's KV cache, and the base model generates. Short time to first token.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        help_text = getattr(module, "HELP", None)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kvp_mlx.errors import KVPError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KVPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
