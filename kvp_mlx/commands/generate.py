"""`kvp-mlx generate`: prefill a prompt with a method (kvp by default), then decode with the base."""

from __future__ import annotations

import argparse
import sys

from kvp_mlx.commands.method_flags import method_option, method_options

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
    from kvp_mlx.commands.method_flags import add_method_arguments, method_summaries
    from kvp_mlx.methods import available_methods

    parser.description = DESCRIPTION
    parser.add_argument("--model", help="KV Prediction directory, mlx-lm directory or Hugging Face repo id "
                        "(default: the embedded demo model)")
    parser.add_argument("--prompt", "-p", required=True, help="prompt text, or '-' to read standard input")
    parser.add_argument("--method", default="kvp", choices=available_methods(),
                        help=f"prefill method (default: kvp). {method_summaries()}")
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
    parser.add_argument("--compare", action="store_true",
                        help="run base and the chosen method (kvp when --method is base) on the same prompt; "
                        "print both TTFTs and whether the first tokens agree")
    parser.add_argument("--verbose", "-v", action="store_true", help="print model and method details")
    add_method_arguments(parser)


STDIN_QUIET_S = 1.0  # under a launch, the prompt on standard input ends after this long without data


def _read_prompt(args: argparse.Namespace) -> str:
    """``--prompt``, or standard input for ``-``.

    Under a distributed launch standard input cannot be read to its end: mlx.launch forwards its
    own input to every rank but never closes theirs. So rank 0 alone reads it, waiting at most
    ``--runahead-timeout`` for the first data and ending the prompt once input has been quiet for
    ``STDIN_QUIET_S``, and shares it with the other ranks (MPI gives standard input to rank 0 only).
    """
    from kvp_mlx.errors import KVPError
    from kvp_mlx.runahead.group import join_group, launched_as_ranks, share_text

    if args.prompt != "-":
        return args.prompt
    if not launched_as_ranks():
        return sys.stdin.read()
    group = join_group(method_option(args, "runahead", "timeout_s"))
    prompt, error = None, None
    if group.rank() == 0:
        try:
            prompt = _read_launched_stdin(method_option(args, "runahead", "timeout_s"))
        except KVPError as e:
            error = e
    # rank 0 may spend the whole timeout waiting for input, then the quiet period
    prompt = share_text(group, prompt, 2 * method_option(args, "runahead", "timeout_s") + STDIN_QUIET_S + 10)
    if error is not None:
        raise error
    if prompt is None:
        raise KVPError("rank 0 received no prompt on standard input; pass the prompt as --prompt TEXT, "
                       'e.g. --prompt "$(cat FILE)"')
    return prompt


def _read_launched_stdin(timeout_s: float) -> str:
    import os
    import select

    from kvp_mlx.errors import KVPError

    nothing = (f"no prompt arrived on standard input within {timeout_s:g} s (--runahead-timeout); under "
               "mlx.launch standard input is the launcher's and never ends: pass the prompt as --prompt TEXT, "
               'e.g. --prompt "$(cat FILE)"')
    if sys.stdin is None:
        raise KVPError(nothing)
    fd, wait = sys.stdin.fileno(), timeout_s
    chunks: list[bytes] = []
    while True:
        if not select.select([fd], [], [], wait)[0]:
            if chunks:
                break  # quiet after some input: the launcher never closes it, take what came
            raise KVPError(nothing)
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
        wait = STDIN_QUIET_S
    return b"".join(chunks).decode("utf-8", errors="replace")


def _report(last, label: str = "") -> None:
    tag = f"[{label}] " if label else ""
    print(f"{tag}Prompt: {last.prompt_tokens} tokens, TTFT {last.ttft_s * 1000:.1f} ms (method {last.method})")
    print(f"{tag}Generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s")
    print(f"{tag}Peak memory: {last.peak_memory_gb:.3f} GB")


def _stream(model, prompt: str, args: argparse.Namespace, method: str, show: bool):
    from kvp_mlx.generation import stream_generate

    last = None
    for last in stream_generate(
        model, prompt, method=method, max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.seed, prefill_step_size=args.prefill_step_size,
        **(method_options(args, method) if method == args.method else {}),
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

    method_option(args, "runahead", "timeout_s")  # checked before the prompt is read (it bounds the wait)
    prompt = _read_prompt(args)
    if not prompt:
        raise KVPError("empty prompt")
    if args.max_tokens < 1:
        raise KVPError("--max-tokens must be at least 1")
    method_options(args, args.method)  # a wrong method option fails here, before any work
    device = set_device(args.device)
    if args.method == "runahead" and not _is_output_rank(args):
        return _help_runahead_prefill(args, prompt)
    model = _load_runahead_rank(args) if args.method == "runahead" else load(args.model, dtype=args.dtype)
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

    group = join_group(method_option(args, "runahead", "timeout_s"))
    if args.compare and group.size() > 1:
        raise KVPError("--compare runs in one process; to compare runahead over several ranks with base "
                       "prefill use `kvp-mlx runahead-bench`")
    return group.rank() == decoding_rank(group)


def _ranks_ready(args: argparse.Namespace) -> None:
    """Runahead: every rank has loaded the model before the timed prefill starts."""
    from kvp_mlx.runahead.group import barrier, join_group

    group = join_group(method_option(args, "runahead", "timeout_s"))
    barrier(group, method_option(args, "runahead", "timeout_s"))
    if args.verbose:
        print(f"runahead: rank {group.rank()} of {group.size()} starts the prefill", file=sys.stderr, flush=True)


def _help_runahead_prefill(args: argparse.Namespace, prompt: str) -> int:
    """A rank that does not decode: take part in the prefill, print nothing, exit."""
    from kvp_mlx.generation import encode_prompt
    from kvp_mlx.methods import run_prefill

    model = _load_runahead_rank(args)
    ids = encode_prompt(model, prompt)
    _ranks_ready(args)
    run_prefill(model, ids[None], method="runahead", prefill_step_size=args.prefill_step_size,
                **method_options(args, "runahead"))
    return 0


def _load_runahead_rank(args: argparse.Namespace):
    """Load the model under the watchdog: a rank never hangs in set-up (its peers wait in a barrier)."""
    from kvp_mlx.model import load
    from kvp_mlx.runahead.group import join_group, watchdog

    rank = join_group(method_option(args, "runahead", "timeout_s")).rank()
    with watchdog.guard(f"runahead rank {rank}: loading the model", method_option(args, "runahead", "timeout_s"),
                        cause="loading is stuck or slow (raise --runahead-timeout for a slow disk)"):
        return load(args.model, dtype=args.dtype)


def _first_token(model, prompt: str, args: argparse.Namespace, method: str) -> int:
    ns = argparse.Namespace(**{**vars(args), "max_tokens": 1})
    return _stream(model, prompt, ns, method, show=False).token
