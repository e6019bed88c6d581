"""Decode speed with speculative decoding: ``--draft aux`` (the auxiliary model drafts) against plain
greedy decoding, on the embedded demo model.

    python -m bench.draft_speed [--max-tokens 200] [--repetitions 5] [--num-draft-tokens 2 3 4]

Cases (interleaved, rotating order, as every kvp-mlx benchmark): ``kvp`` and ``base`` prefill, each
without a draft and with the auxiliary as the draft for each ``num_draft_tokens``. Per case: median
decode tokens/s (``generation_tps`` of the final response, mlx-lm's figure: tokens after the first /
seconds after the first), median TTFT, the acceptance rate (the fraction of generated tokens that came
from the draft, ``from_draft``) and whether every run's tokens equal the same method's run without a
draft (speculative decoding at temperature 0 must not change them). Writes JSON and markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import platform
import shlex
import statistics
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.timing import Case, run_interleaved

DEFAULT_OUT = Path("bench/results/draft")


def default_prompt(chars: int) -> str:
    """The start of Python's own textwrap.py: code the demo model (trained on Python-like text) continues."""
    return inspect.getsource(textwrap)[:chars]


def drafted_tokens(flags: list[bool], k: int, max_tokens: int) -> int:
    """Tokens the draft proposed, from mlx-lm's ``from_draft`` flags: each verify step drafts
    ``min(k, tokens left)``, yields the accepted ones (True) and then one token of the model (False)."""
    pos = drafted = 0
    while pos < len(flags):
        d = min(k, max_tokens - pos)
        drafted += d
        accepted = 0
        while accepted < d and pos < len(flags) and flags[pos]:
            accepted, pos = accepted + 1, pos + 1
        if pos < len(flags):
            pos += 1  # the model's own token ends the step
    return drafted


def make_case(model, prompt: str, method: str, draft: str | None, k: int, max_tokens: int,
              records: dict[str, list[dict]]) -> Case:
    from kvp_mlx.generation import stream_generate

    label = method if draft is None else f"{method} + draft aux (k={k})"
    records[label] = []

    def measure() -> float:
        responses = list(stream_generate(model, prompt, method=method, draft=draft, num_draft_tokens=k,
                                         max_tokens=max_tokens, use_chat_template=False))
        last = responses[-1]
        records[label].append(dict(
            tokens=[r.token for r in responses], generation_tps=last.generation_tps, ttft_s=last.ttft_s,
            accepted=sum(r.from_draft for r in responses), generated=len(responses),
            drafted=drafted_tokens([r.from_draft for r in responses], k, max_tokens) if draft else 0,
            finish_reason=last.finish_reason, peak_memory_gb=last.peak_memory,
        ))
        return last.ttft_s

    return Case(label=label, measure=measure, method=method, aux="aux" if draft else None)


def summarise(cases: list[Case], records: dict[str, list[dict]], warmup: int) -> list[dict]:
    rows: list[dict[str, Any]] = []
    reference = {c.method: records[c.label][0]["tokens"] for c in cases if c.aux is None and records[c.label]}
    for c in cases:
        runs = records[c.label][warmup:]  # the warm-up runs come first
        if not runs:
            rows.append(dict(label=c.label, skipped=c.skipped))
            continue
        tps = [r["generation_tps"] for r in runs]
        ttft = [r["ttft_s"] for r in runs]
        rate = [r["accepted"] / r["generated"] for r in runs]
        rows.append(dict(
            label=c.label, method=c.method, draft=c.aux,
            median_generation_tps=statistics.median(tps), generation_tps=tps,
            median_ttft_s=statistics.median(ttft), ttft_s=ttft,
            acceptance_rate=statistics.median(rate), acceptance_rates=rate,
            drafted_accepted=statistics.median(r["accepted"] / r["drafted"] if r["drafted"] else 0.0 for r in runs),
            generated_tokens=sorted({r["generated"] for r in runs}),
            finish_reasons=sorted({r["finish_reason"] for r in runs}),
            tokens_identical_to_no_draft=all(r["tokens"] == reference[c.method] for r in records[c.label]),
            peak_memory_gb=max(r["peak_memory_gb"] for r in runs),
        ))
    return rows


def markdown(result: dict) -> str:
    env, st = result["environment"], result["settings"]
    lines = [
        "# kvp-mlx speculative decoding with the auxiliary model as the draft (embedded demo model)",
        "",
        f"{result['created']} on {result['host']}; {env.get('cpu', '?')}; MLX {env.get('mlx', '?')}, "
        f"mlx-lm {env.get('mlx-lm', '?')}; Python {result['python']}; float32 on the CPU.",
        f"Prompt: the first {st['prompt_chars']} characters of Python's textwrap.py ({result['prompt_tokens']} "
        f"tokens, raw, no chat template); {st['max_tokens']} tokens generated greedily; {st['warmup']} warm-up "
        f"and {st['repetitions']} timed runs per case, cases interleaved (rotating order); "
        f"{result['duration_s']:.0f} s in all.",
        f"Load average before {result['load_average_before']}, after {result['load_average_after']} "
        "(the machine is shared with other jobs).",
        f"Command: `{result['command']}`",
        "",
        "Decode tokens/s is mlx-lm's `generation_tps` of the final response (tokens after the first / seconds "
        "after the first); acceptance = generated tokens that came from the draft (`from_draft`) / generated "
        "tokens; *drafted accepted* = accepted / drafted tokens (each verify step drafts k); *identical* = every "
        "run's tokens equal the same method's run without a draft.",
        "",
        "| case | decode tokens/s (median) | min-max | vs no draft | TTFT median (s) | acceptance "
        "| drafted accepted | generated | identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    plain = {r["method"]: r["median_generation_tps"] for r in result["cases"] if "method" in r and not r["draft"]}
    for r in result["cases"]:
        if "median_generation_tps" not in r:
            lines.append(f"| {r['label']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        speedup = r["median_generation_tps"] / plain[r["method"]]
        lines.append(
            f"| {r['label']} | {r['median_generation_tps']:.1f} | {min(r['generation_tps']):.1f}-"
            f"{max(r['generation_tps']):.1f} | {speedup:.2f}x | {r['median_ttft_s']:.3f} "
            f"| {r['acceptance_rate']:.1%} | {r['drafted_accepted']:.1%} "
            f"| {', '.join(map(str, r['generated_tokens']))} "
            f"| {'yes' if r['tokens_identical_to_no_draft'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.draft_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--prompt-chars", type=int, default=1200, help="characters of textwrap.py in the prompt")
    p.add_argument("--num-draft-tokens", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--methods", nargs="+", default=["kvp", "base"])
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--name", default="draft-demo")
    args = p.parse_args(argv)

    import kvp_mlx
    from kvp_mlx.generation import encode_prompt
    from kvp_mlx.runtime_env import env_report

    model = kvp_mlx.load()
    prompt = default_prompt(args.prompt_chars)
    n_prompt = int(encode_prompt(model, prompt, use_chat_template=False).size)
    records: dict[str, list[dict]] = {}
    cases = []
    for method in args.methods:
        cases.append(make_case(model, prompt, method, None, 1, args.max_tokens, records))
        for k in args.num_draft_tokens:
            cases.append(make_case(model, prompt, method, "aux", k, args.max_tokens, records))
    started, load_before, tic = datetime.now(), report.load_average(), time.perf_counter()
    print(f"{len(cases)} cases, prompt {n_prompt} tokens, {args.max_tokens} tokens each; load average "
          f"{load_before}", file=sys.stderr)
    run_interleaved(cases, args.warmup, args.repetitions)
    result = dict(
        schema="kvp-mlx-bench-draft/1", name=args.name, created=started.isoformat(timespec="seconds"),
        host=platform.node(), python=platform.python_version(),
        command=shlex.join(["python", "-m", "bench.draft_speed",
                            *(argv if argv is not None else sys.argv[1:])]),
        settings=dict(max_tokens=args.max_tokens, prompt_chars=args.prompt_chars, methods=args.methods,
                      num_draft_tokens=args.num_draft_tokens, repetitions=args.repetitions, warmup=args.warmup),
        prompt_tokens=n_prompt, prompt_sha256=hashlib.sha256(prompt.encode()).hexdigest(),
        load_average_before=load_before, load_average_after=report.load_average(),
        duration_s=time.perf_counter() - tic,
        environment={**env_report(), "cpu": report.cpu_model()},
        cases=summarise(cases, records, max(args.warmup, 1)),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(result, args.out / f"{args.name}.json")
    text = markdown(result)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    print(f"wrote {args.out / args.name}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
