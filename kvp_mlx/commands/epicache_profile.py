"""`kvp-mlx epicache-profile`: per-layer key sensitivity of a model (EpiCache's per-layer budgets),
computed once and stored beside the model (epicache_profile.json)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvp_mlx.epicache.budgets import allocate, save_profile, sensitivity
from kvp_mlx.errors import KVPError
from kvp_mlx.prompting import decode_utf8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a KV Prediction or mlx-lm model directory")
    parser.add_argument("--text", help="a long text file to profile on (default: a synthetic conversation)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of it to use (default 8192)")
    parser.add_argument("--block", type=int, default=4096, help="restricted-attention block (default 4096)")
    parser.add_argument("--sink", type=int, default=128, help="sink tokens (default 128)")
    parser.add_argument("--out", help="directory to write the profile to (default: the model's)")
    parser.add_argument("--show-budget", type=int, help="also print the budgets this gives for M")
    parser.add_argument("--alpha", type=float, default=1.1, help="alpha for --show-budget (default 1.1)")


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.epicache.synthetic import profile_text
    from kvp_mlx.model import load

    text = read_text_file(args.text) if args.text else None
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise KVPError(f"--out {out}: not a directory")
    model = load(args.model)
    if text is None:
        text = profile_text(args.tokens * 2)
    ids = list(model.tokenizer.encode(text))[: args.tokens]
    sens = sensitivity(model.base, ids, args.block, args.sink)
    out = out or model.path
    if out is None:
        raise KVPError("no directory to write the profile to (pass --out)")
    try:
        out.mkdir(parents=True, exist_ok=True)  # a missing --out is created, as mlx_lm.convert does
    except OSError as e:
        raise KVPError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    path = save_profile(out, sens, tokens=len(ids), block=args.block, sink=args.sink,
                        text=args.text or "synthetic")
    print(f"sensitivity per layer: {', '.join(f'{s:.4f}' for s in sens)}")
    if args.show_budget:
        print(f"budgets for M={args.show_budget}, alpha={args.alpha}: {allocate(sens, args.show_budget, args.alpha)}")
    print(f"wrote {path}")
    return 0


def read_text_file(name: str) -> str:
    """The UTF-8 text of file ``name``; a missing, unreadable or non-text file is a one-line error."""
    try:
        data = Path(name).read_bytes()
    except OSError as e:
        raise KVPError(f"{name}: {e.strerror or e}") from None
    return decode_utf8(data, name)
