"""`kvp-mlx generate`: prefill a prompt with a method (kvp by default), then decode with the base."""

from __future__ import annotations

import argparse
import sys

HELP = "generate text from a prompt, reporting time to first token"
DESCRIPTION = """\
Generate a continuation of a prompt. With --method kvp (the default) the auxiliary model
processes the prompt, the predictor fills the base model's KV cache, and the base model
produces the first token and decodes on its own. Prints the text as it streams, then the
prompt length, TTFT (prompt token ids ready -> first token available), generation speed and
peak memory. Without --model the embedded default model runs (offline).
--method lazy (LazyLLM token pruning, --lazy-schedule) and --method rp (random token pruning,
--rp-keep) use the base model alone and process one prompt at a time."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvp_mlx.methods import available_methods

    parser.description = DESCRIPTION
    parser.add_argument("--model", help="KV Prediction directory, mlx-lm directory or Hugging Face repo id "
                        "(default: the embedded demo model)")
    parser.add_argument("--prompt", "-p", required=True, help="prompt text, or '-' to read standard input")
    parser.add_argument("--method", default="kvp", choices=available_methods(),
                        help="prefill method (default: kvp)")
    parser.add_argument("--max-tokens", "-m", type=int, default=100, help="tokens to generate (default: 100)")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (default: off)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling (default: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (default: off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--prefill-step-size", type=int, default=2048,
                        help="prompt tokens per prefill chunk (default: 2048)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="compute dtype (default: float32 on cpu, the checkpoint's own dtype on gpu)")
    parser.add_argument("--device", choices=["cpu", "gpu"], help="device (default: MLX's)")
    parser.add_argument("--lazy-schedule", default=None,
                        help="--method lazy: pruning schedule, a preset (L0.75-0.75 ... L0.75-0.01, "
                        "L0.50-0.5 ... L0.50-0.01) or 'layer:keep,...' (default: L0.75-0.25)")
    parser.add_argument("--rp-keep", type=float, default=None,
                        help="--method rp: fraction of prompt tokens kept (default: 0.5)")
    parser.add_argument("--compare", action="store_true",
                        help="run base and the chosen method (kvp when --method is base) on the same prompt; "
                        "print both TTFTs and whether the first tokens agree")
    parser.add_argument("--verbose", "-v", action="store_true", help="print model and method details")
    ra = parser.add_argument_group(
        "runahead", "--method runahead splits the prefill over the ranks of an mx.distributed group; "
        "launch with e.g. `mlx.launch --backend ring --hosts 127.0.0.1 -n 2 -- kvp-mlx generate "
        "--method runahead ...`. The last rank decodes and prints; the others print nothing.")
    ra.add_argument("--runahead-split", choices=["balanced", "even"], default="balanced",
                    help="prompt split between ranks: balanced by a cost model (default) or even")
    ra.add_argument("--runahead-split-table", metavar="FILE",
                    help="split table (JSON, from `kvp-mlx runahead-bench --save-table`) for the balanced split")
    ra.add_argument("--runahead-timeout", type=float, default=120.0, metavar="SECONDS",
                    help="give up (exit with an error) when a peer rank sends nothing for this long (default: 120)")


def _read_prompt(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def _report(last, label: str = "") -> None:
    tag = f"[{label}] " if label else ""
    print(f"{tag}Prompt: {last.prompt_tokens} tokens, TTFT {last.ttft_s * 1000:.1f} ms (method {last.method})")
    print(f"{tag}Generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s")
    print(f"{tag}Peak memory: {last.peak_memory_gb:.3f} GB")


def method_options(args: argparse.Namespace, method: str) -> dict:
    """Method-specific options (pruning methods, runahead), passed through to the prefill method."""
    if method == "lazy" and args.lazy_schedule is not None:
        return {"schedule": args.lazy_schedule}
    if method == "rp" and args.rp_keep is not None:
        return {"keep": args.rp_keep}
    if method == "runahead":
        return {"split": args.runahead_split, "split_table": args.runahead_split_table,
                "timeout_s": args.runahead_timeout}
    return {}


def _stream(model, prompt: str, args: argparse.Namespace, method: str, show: bool):
    from kvp_mlx.generation import stream_generate

    last = None
    for last in stream_generate(
        model, prompt, method=method, max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.seed, prefill_step_size=args.prefill_step_size,
        **method_options(args, method),
    ):
        if show:
            print(last.text, end="", flush=True)
    if show:
        print()
    return last


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.errors import KVPError
    from kvp_mlx.model import load
    from kvp_mlx.runtime_env import dtype_name, set_device

    prompt = _read_prompt(args.prompt)
    if not prompt:
        raise KVPError("empty prompt")
    if args.max_tokens < 1:
        raise KVPError("--max-tokens must be at least 1")
    if args.lazy_schedule is not None and args.method != "lazy":
        raise KVPError("--lazy-schedule applies to --method lazy")
    if args.rp_keep is not None and args.method != "rp":
        raise KVPError("--rp-keep applies to --method rp")
    if args.runahead_timeout <= 0:
        raise KVPError("--runahead-timeout must be positive")
    device = set_device(args.device)
    if args.method == "runahead" and not _is_output_rank(args):
        return _help_runahead_prefill(args, prompt)
    model = load(args.model, dtype=args.dtype)
    if model.is_random:
        print("note: this model has RANDOM weights (a demo/timing model, not trained): "
              "expect meaningless text", file=sys.stderr)
    if args.verbose:
        print(f"model: {model.path} ({model.config.get('source', 'mlx-lm directory')}), device {device}, "
              f"dtype {dtype_name(model.dtype)}", file=sys.stderr)
    if not args.compare:
        if args.method == "runahead":
            _ranks_ready(args)
        print("=" * 10)
        last = _stream(model, prompt, args, args.method, show=True)
        print("=" * 10)
        _report(last)
        return 0
    # Warm up once so the first timed run does not pay for one-time setup.
    _stream(model, prompt, argparse.Namespace(**{**vars(args), "max_tokens": 1}), "base", show=False)
    other = args.method if args.method != "base" else "kvp"
    results = {}
    for method in ("base", other):
        print(f"========== {method}")
        results[method] = _stream(model, prompt, args, method, show=True)
    print("=" * 10)
    firsts = {}
    for method, last in results.items():
        _report(last, method)
    for method in results:  # first token of each method (greedy unless --temp)
        firsts[method] = _first_token(model, prompt, args, method)
    speedup = results["base"].ttft_s / results[other].ttft_s
    agree = "yes" if firsts["base"] == firsts[other] else "no"
    print(f"TTFT base {results['base'].ttft_s * 1000:.1f} ms, {other} {results[other].ttft_s * 1000:.1f} ms "
          f"(speedup {speedup:.2f}x); first tokens agree: {agree}")
    return 0


def _is_output_rank(args: argparse.Namespace) -> bool:
    """Under mlx.launch only the rank that decodes (the last) prints; alone, this process does."""
    from kvp_mlx.runahead.group import join_group
    from kvp_mlx.errors import KVPError
    from kvp_mlx.runahead.prefill import decoding_rank

    group = join_group(args.runahead_timeout)
    if args.compare and group.size() > 1:
        raise KVPError("--compare runs in one process; to compare runahead over several ranks with base "
                       "prefill use `kvp-mlx runahead-bench`")
    return group.rank() == decoding_rank(group)


def _ranks_ready(args: argparse.Namespace) -> None:
    """Runahead: every rank has loaded the model before the timed prefill starts."""
    from kvp_mlx.runahead.group import barrier, join_group

    group = join_group(args.runahead_timeout)
    barrier(group, args.runahead_timeout)
    if args.verbose:
        print(f"runahead: rank {group.rank()} of {group.size()} starts the prefill", file=sys.stderr, flush=True)


def _help_runahead_prefill(args: argparse.Namespace, prompt: str) -> int:
    """A rank that does not decode: take part in the prefill, print nothing, exit."""
    from kvp_mlx.generation import encode_prompt
    from kvp_mlx.model import load

    model = load(args.model, dtype=args.dtype)
    ids = encode_prompt(model, prompt)
    _ranks_ready(args)
    model.prefill(ids[None], method="runahead", prefill_step_size=args.prefill_step_size,
                  **method_options(args, "runahead"))
    return 0


def _first_token(model, prompt: str, args: argparse.Namespace, method: str) -> int:
    ns = argparse.Namespace(**{**vars(args), "max_tokens": 1})
    return _stream(model, prompt, ns, method, show=False).token
