"""The `kvp-mlx` command: one subcommand per module, user errors as one line without a traceback.

Only the chosen subcommand's module is imported (``kvp-mlx --help`` imports this table alone), as
``mlx_lm``'s command dispatcher does.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module exposing add_arguments(parser) and run(args) -> int, one line for --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("kvp_mlx.commands.generate", "generate text from a prompt, reporting time to first token"),
    "chat": ("kvp_mlx.commands.chat", "chat with a model: a session keeps its caches across turns (like mlx_lm.chat)"),
    "cache-prompt": ("kvp_mlx.commands.cache_prompt",
                     "prefill a prompt and save the session to a file (like mlx_lm.cache_prompt)"),
    "serve": ("kvp_mlx.commands.serve",
              "serve a model over an OpenAI-compatible HTTP API (KV Prediction prefill, prefix reuse, idle repair)"),
    "bench": ("kvp_mlx.commands.bench",
              "time to first token and decode speed of a model: base, kvp and plain mlx-lm side by side"),
    "evaluate": ("kvp_mlx.commands.evaluate",
                 "evaluate a prefill method on lm-evaluation-harness tasks (needs kvp-mlx[eval])"),
    "train": ("kvp_mlx.commands.train", "train a KV predictor (and optionally the auxiliary model) for a base model"),
    "convert": ("kvp_mlx.convert.cli",
                "convert a corenet checkpoint (KV Prediction or single model) to a kvp-mlx / mlx-lm directory"),
    "conv-eval": ("kvp_mlx.commands.conv_eval",
                  "evaluate conversation QA (LoCoMo, LongMemEval, Realtalk, synthetic) under a KV budget (EpiCache)"),
    "epicache-profile": ("kvp_mlx.commands.epicache_profile",
                         "profile a model's per-layer KV sensitivity for EpiCache's per-layer budgets"),
    "env": ("kvp_mlx.commands.env", "print the MLX version, device, BLAS in use and dtype policy"),
}

DESCRIPTION = ("KV Prediction on MLX: a small auxiliary model prefills the prompt, learned maps predict the base "
               "model's KV cache, and the base model generates. Short time to first token.")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module (when given) is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="kvp-mlx", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kvp_mlx.errors import exit_status

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    return exit_status(lambda: args._run(args))


if __name__ == "__main__":
    sys.exit(main())
