"""`kvp-mlx bench`: time to first token of every prefill method beside plain mlx-lm (kvp_mlx.bench.ttft)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvp_mlx.errors import KVPError

HELP = "benchmark time to first token of every prefill method beside plain mlx-lm"
DESCRIPTION = """\
Time to first token (prompt token ids ready -> first token sampled and evaluated) of every
registered prefill method (base, kvp and aux per auxiliary model, and the others), of plain
mlx-lm's prefill of the same base model, and of KV Prediction's parts (auxiliary prefill of T-1
tokens, one base step). Cases run interleaved, after warm-up, with the same prefill step size.
By default the models are the paper's OpenELM pairs with random weights, built in memory; --model
adds a model directory (or repo id). Writes JSON (every sample, the environment), a markdown
table and PNG plots to --out.

--profile conversation times a warm turn instead: a new message of --new-tokens tokens over a
history of --history-tokens tokens already in a session (base with prefix reuse, kvp on the warm
cache), both re-prefilling everything (cold), and the cost of session.repair() after the kvp turn."""

def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def _names(text: str) -> list[str]:
    return [v for v in text.replace(",", " ").split() if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvp_mlx.bench.cases import method_listing
    from kvp_mlx.bench.models import PAIRS
    from kvp_mlx.bench.ttft import PROFILES

    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="defaults for the options below: quick (make bench), full (make bench-full) or "
                        "conversation (warm turns over a long history)")
    parser.add_argument("--pairs", type=_names,
                        help=f"random-weight OpenELM pairs, comma-separated: {', '.join(PAIRS)} "
                        "(default: the profile's; none when --model is given)")
    parser.add_argument("--model", action="append", default=[],
                        help="a KV Prediction or mlx-lm model directory or repo id (repeatable)")
    parser.add_argument("--methods", type=_names,
                        help="methods to time, comma-separated (default: all registered ones and plain mlx-lm; "
                        f"method options take their defaults): {method_listing()}")
    parser.add_argument("--prompt-lengths", type=_ints, help="prompt lengths in tokens, e.g. 128,512")
    parser.add_argument("--batch-sizes", type=_ints, help="batch sizes, e.g. 1,8")
    parser.add_argument("--history-tokens", type=int,
                        help="conversation profile: tokens of history already in the session (default: 1024)")
    parser.add_argument("--new-tokens", type=_ints,
                        help="conversation profile: new message lengths in tokens, e.g. 32,256 (default: 32,256)")
    parser.add_argument("--device", type=_names, default=["cpu"], help="cpu, gpu or cpu,gpu (default: cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="compute dtype (default: float32 on cpu; on gpu float16 for the random-weight pairs, "
                             "the checkpoint's own dtype for --model)")
    parser.add_argument("--repetitions", "-n", type=int, help="timed repetitions per case (default: 5)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up runs per case (default: 1; at least 1)")
    parser.add_argument("--prefill-step-size", type=int, default=256,
                        help="prompt tokens per prefill chunk, the same for every method (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--out", help="output folder (default: bench/results/<date>-<host>)")
    parser.add_argument("--name", help="file name stem of the outputs (default: the profile name)")
    parser.add_argument("--no-plots", action="store_true", help="write JSON and markdown only")
    parser.add_argument("--from-json", metavar="FILE",
                        help="measure nothing: redo the checks, markdown and plots of an earlier run's JSON")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="skip the calibration of the TTFT model (and the predicted column) before the runs")
    parser.add_argument("--predict", action="store_true",
                        help="run no model: calibrate this machine (under a minute) and print the predicted TTFT "
                        "of base, kvp and aux for --pairs at --prompt-lengths (choose an auxiliary before training)")



def run(args: argparse.Namespace) -> int:
    from kvp_mlx.bench import ttft

    if args.from_json:
        return ttft.rerender(Path(args.from_json), args.no_plots)
    if args.predict:
        return ttft.predict_only(args.pairs, args.prompt_lengths, args.batch_sizes, args.prefill_step_size,
                                 args.profile, args.dtype)
    out = Path(args.out) if args.out else None
    if args.profile == "conversation":
        from kvp_mlx.bench import conversation

        _refuse(args, "the conversation profile", ["methods", "prompt_lengths", "batch_sizes"])
        if args.device != ["cpu"]:
            raise KVPError("the conversation profile runs on the cpu only (--device cpu)")
        settings = conversation.make_settings(
            pairs=args.pairs, models=args.model, history_tokens=args.history_tokens, new_tokens=args.new_tokens,
            dtype=args.dtype, repetitions=args.repetitions, warmup=args.warmup,
            prefill_step_size=args.prefill_step_size, seed=args.seed,
        )
        return conversation.run_benchmark(settings, out, args.name, args.no_plots)
    _refuse(args, f"profile {args.profile} (only --profile conversation)", ["history_tokens", "new_tokens"])
    settings = ttft.make_settings(
        profile=args.profile, pairs=args.pairs, models=args.model, methods=args.methods,
        prompt_lengths=args.prompt_lengths, batch_sizes=args.batch_sizes, devices=args.device,
        dtype=args.dtype, repetitions=args.repetitions, warmup=args.warmup,
        prefill_step_size=args.prefill_step_size, seed=args.seed, calibrate=not args.no_calibrate,
    )
    return ttft.run_benchmark(settings, out, args.name, args.no_plots)


def _refuse(args: argparse.Namespace, what: str, names: list[str]) -> None:
    given = [n for n in names if getattr(args, n) is not None]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise KVPError(f"{flags}: not used by {what}")
