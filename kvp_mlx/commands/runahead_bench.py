"""`kvp-mlx runahead-bench`: KV-Runahead TTFT with N local ranks against single-process prefill,
and the cost model's predicted speedups for more ranks and longer prompts."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

HELP = "measure KV-Runahead (distributed prefill) on local ranks and predict its speedup"
DESCRIPTION = """\
Starts --ranks local processes (an MLX ring on 127.0.0.1) and measures the time to first token
of `runahead` prefill with an even and a balanced split against single-process base prefill,
interleaved, after a warm-up (median of --repeats rounds). The balanced split comes from a cost
model measured on this machine first. Without --model a random-weight model of --shape is built.
--predict prints the cost model's speedups for 2, 4 and 8 ranks on 2k-16k-token prompts, beside
a tensor + sequence parallel baseline, for this machine's model and for Llama-2-7B on A100-class
links (FLOP counts; no measurement). On a machine with fewer cores than ranks the ranks share cores: read the
measured speedup as an overhead check, not as what separate devices would give."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("--model", help="mlx-lm or KV Prediction directory (default: a random model of --shape)")
    parser.add_argument("--shape", default="OpenELM-270M", help="corenet OpenELM shape for the random model "
                        "(default: OpenELM-270M)")
    parser.add_argument("--layers", type=int, help="keep only the first N layers of --shape (shorter runs)")
    parser.add_argument("--ranks", type=int, default=2, help="local ranks (default: 2)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length (default: 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (default: 3)")
    parser.add_argument("--variants", default="base,even,balanced",
                        help="comma-separated subset of base,even,balanced (default: all)")
    parser.add_argument("--save-table", metavar="FILE",
                        help="write the measured split table (for `generate --runahead-split-table`)")
    parser.add_argument("--predict", action="store_true", help="also print the cost model's predicted speedups")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-step rank timeout in seconds (default: 600)")


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.errors import KVPError
    from kvp_mlx.runahead.split import CostModel
    from kvp_mlx.runahead.bench import build_bench_model, prediction_tables, run_runahead_bench

    if args.ranks < 2:
        raise KVPError("--ranks must be at least 2")
    if args.prompt_tokens < 1 or args.repeats < 1:
        raise KVPError("--prompt-tokens and --repeats must be at least 1")
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="kvp-runahead-model-") as tmp:
        model_dir = args.model
        if model_dir is None:
            print(f"building a random-weight {args.shape} model"
                  f"{f' ({args.layers} layers)' if args.layers else ''} ...", file=sys.stderr)
            model_dir = build_bench_model(tmp, args.shape, n_layers=args.layers)
        result = run_runahead_bench(model_dir, ranks=args.ranks, prompt_tokens=args.prompt_tokens,
                                    repeats=args.repeats, variants=variants, timeout_s=args.timeout,
                                    save_table=args.save_table)
    print(result.summary())
    if args.predict:
        print("\n".join(prediction_tables(CostModel(**result.cost_model))))
    if args.json:
        from dataclasses import asdict

        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=1)
    return 0
