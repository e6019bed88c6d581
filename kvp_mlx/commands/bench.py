"""`kvp-mlx bench`: time your own model, as `mlx_lm.benchmark` does, with each prefill method beside
plain mlx-lm on the same base model."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from kvp_mlx.errors import KVPError

DESCRIPTION = """\
Times a model directory on random prompts of --prompt-tokens tokens: the time to first token
(from calling the generator to its first token) and the decode speed of --generation-tokens
tokens, for each --methods entry (default: base, kvp when the directory has an auxiliary model,
and `mlx-lm`: mlx_lm.stream_generate on the same base weights). Cases run interleaved in rotating
order after --warmup untimed runs each; the table gives medians over --num-trials and each TTFT as
a ratio to mlx-lm's. The lab's benchmark suite (random OpenELM pairs, FLOPs, plots) is
`python -m bench.ttft` in the repository."""

MLX_LM = "mlx-lm"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add("--model", help="KV Prediction or mlx-lm directory, or repo id (default: the embedded demo model)")
    add("--prompt-tokens", "-p", type=_positive, default=512, help="prompt length in tokens (default: 512)")
    add("--generation-tokens", "-g", type=_positive, default=32, help="tokens to generate (default: 32)")
    add("--num-trials", "-n", type=_positive, default=3, help="timed trials per case (default: 3)")
    add("--warmup", type=_positive, default=1, help="untimed runs per case first (default: 1)")
    add("--methods", default=None,
        help=f"comma-separated prefill methods and/or {MLX_LM} (default: base, kvp if the model has an "
        f"auxiliary, {MLX_LM})")
    add("--prefill-step-size", type=_positive, default=2048, help="prompt tokens per prefill chunk (default: 2048)")
    add("--seed", type=int, default=0, help="seed of the random prompt (default: 0)")
    add("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (default as generate)")


@dataclass
class Timing:
    name: str
    run: Callable[[], tuple[float, float]]  # -> (ttft_s, generation tokens/s)
    ttft_s: list[float] = field(default_factory=list)
    tps: list[float] = field(default_factory=list)


def _kvp_case(model, method: str, prompt: list[int], max_tokens: int, step: int) -> Callable[[], tuple[float, float]]:
    from kvp_mlx.generation import stream_generate

    def run() -> tuple[float, float]:
        first = last = None
        for last in stream_generate(model, prompt, method=method, max_tokens=max_tokens, prefill_step_size=step,
                                    context_warning=False):
            first = first or last
        assert first is not None and last is not None
        return first.ttft_s, last.generation_tps

    return run


def _mlx_lm_case(model, prompt: list[int], max_tokens: int, step: int) -> Callable[[], tuple[float, float]]:
    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    def run() -> tuple[float, float]:
        tic = time.perf_counter()
        ttft = None
        tps = 0.0
        for response in stream_generate(model.base, model.tokenizer, mx.array(prompt), max_tokens=max_tokens,
                                        prefill_step_size=step):
            if ttft is None:
                ttft = time.perf_counter() - tic
            tps = response.generation_tps
        assert ttft is not None
        return ttft, tps

    return run


def run(args: argparse.Namespace) -> int:
    import random

    from kvp_mlx.methods import default_method, get_method
    from kvp_mlx.model import load

    model = load(args.model, dtype=args.dtype)
    if args.methods is None:
        names = ["base"] + (["kvp"] if default_method(model) == "kvp" else []) + [MLX_LM]
    else:
        names = [n for n in args.methods.replace(" ", "").split(",") if n]
        if not names:
            raise KVPError("--methods: name at least one method")
    vocab = int(model.base_config.get("vocab_size", 0)) or len(model.tokenizer.vocab)
    rng = random.Random(args.seed)
    prompt = [rng.randrange(vocab) for _ in range(args.prompt_tokens)]
    cases = []
    for name in names:
        if name == MLX_LM:
            cases.append(Timing(name, _mlx_lm_case(model, prompt, args.generation_tokens, args.prefill_step_size)))
        else:
            get_method(name)  # one line for an unknown name, before any work
            cases.append(Timing(name, _kvp_case(model, name, prompt, args.generation_tokens, args.prefill_step_size)))
    print(f"model {model.path}, prompt {args.prompt_tokens} tokens, {args.generation_tokens} generated, "
          f"{args.num_trials} trials", file=sys.stderr)
    for round_index in range(args.warmup + args.num_trials):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:  # rotating order: no case always runs first
            ttft, tps = case.run()
            if round_index >= args.warmup:
                case.ttft_s.append(ttft)
                case.tps.append(tps)
    reference = next((c for c in cases if c.name == MLX_LM), None)
    ref = statistics.median(reference.ttft_s) if reference else None
    print("| case | TTFT median (s) | speedup vs mlx-lm | decode tokens/s |")
    print("|---|---|---|---|")
    for case in cases:
        ttft = statistics.median(case.ttft_s)
        ratio = f"{ref / ttft:.2f}x" if ref else "-"
        print(f"| {case.name} | {ttft:.4f} | {ratio} | {statistics.median(case.tps):.1f} |")
    return 0
