"""LazyLLM next to KV Prediction on a random-weight OpenELM shape: TTFT, FLOPs, agreement.

For each method: tokens computed (share of base's token-layers), the FLOPs-predicted TTFT
speedup, the measured TTFT speedup (median of interleaved repetitions after a warm-up; TTFT =
prompt ids ready -> greedy first token materialised) and, as a weak accuracy proxy, how often
its first token equals base's and the KL divergence of its first-token distribution from base's.
Weights are random, so the proxy says little about a trained model (and nothing for kvp, whose
predictor here is random); the timing and FLOPs columns are what this table is for.

    python -m bench.lazy_table --shape OpenELM-270M --prompt-len 512
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from kvp_mlx import testing as mb
from bench.models import openelm_config
from kvp_mlx.flops import kvp_flops, model_shape, pruned_prefill_flops
from kvp_mlx.methods.lazy_schedule import PRESETS, lazy_tokens_per_layer, rp_tokens_per_layer
from kvp_mlx.model import KVPModel

SHAPES = ("OpenELM-270M", "OpenELM-450M", "OpenELM-1_1B", "OpenELM-3B", "tiny")  # tiny: the smoke test


def shape_config(name: str) -> dict:
    """mlx-lm config of a corenet-named OpenELM shape (the converter's tables), or a tiny one."""
    return mb.tiny_config("openelm", n_layers=8, vocab_size=512) if name == "tiny" else openelm_config(name)


# ---- cases

@dataclass
class Case:
    label: str
    model: KVPModel
    method: str
    options: dict
    flops: int
    token_share: float | None  # prompt token-layers computed, relative to base
    note: str = ""
    times: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)


def _logprobs(logits: mx.array) -> np.ndarray:
    x = np.array(logits[0].astype(mx.float32), dtype=np.float64)
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


def run_case(case: Case, tokens: mx.array, chunk: int) -> tuple[float, mx.array]:
    tic = time.perf_counter()
    res = case.model.prefill(tokens, method=case.method, prefill_step_size=chunk, **case.options)
    assert res.logits is not None  # one process: the logits are here
    first = mx.argmax(res.logits, axis=-1)
    mx.eval(first, res.logits)
    seconds = time.perf_counter() - tic
    logits = res.logits
    del res
    gc.collect()
    return seconds, logits


def build_cases(
    shape: str, T: int, chunk: int, presets: list[str], with_kvp: bool, with_rp: bool, seed: int
) -> list[Case]:
    cfg = shape_config(shape)
    base = mb.build_model(cfg, seed=seed)
    costs = model_shape(base)
    n = len(base.layers)
    plain = KVPModel(base=base, tokenizer=None)
    base_flops = pruned_prefill_flops(costs, [T] * n, chunk)
    cases = [Case("base", plain, "base", {}, base_flops, 1.0)]
    if with_kvp:
        for name, keep in (("KVP-LP-0.75", [i for i in range(n) if i % 4 != 3]),
                           ("KVP-LP-0.50", list(range(0, n, 2)))):
            aux, _ = mb.layer_pruned(base, cfg, keep)
            pred = mb.make_predictor(base, aux, init="random", seed=seed + 1)
            model = KVPModel(base=base, tokenizer=None, aux=aux, predictor=pred)
            f = kvp_flops(costs, model_shape(aux), pred, T, chunk)
            cases.append(Case(f"kvp {name}", model, "kvp", {}, f, None, "random predictor"))
    for p in presets:
        tpl = lazy_tokens_per_layer(p, n, T)
        cases.append(Case(f"lazy {p}", plain, "lazy", {"schedule": p},
                          pruned_prefill_flops(costs, tpl, chunk), sum(tpl) / (n * T)))
    if not with_rp:
        return cases
    # Random pruning with the same token-layers as the middle L0.75 preset, for a matched comparison.
    match = lazy_tokens_per_layer("L0.75-0.25", n, T)
    keep_fraction = round(sum(match) / (n * T), 2)
    tpl = rp_tokens_per_layer(keep_fraction, n, T)
    cases.append(Case(f"rp keep {keep_fraction}", plain, "rp", {"keep": keep_fraction},
                      pruned_prefill_flops(costs, tpl, chunk), sum(tpl) / (n * T),
                      "token-layers matched to L0.75-0.25"))
    return cases


def measure(cases: list[Case], T: int, chunk: int, reps: int, warmup: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for r in range(warmup + reps):
        vocab = cases[0].model.base.args.vocab_size
        tokens = mx.array(rng.integers(0, vocab, size=(1, T)), dtype=mx.int32)
        mx.eval(tokens)
        ref = None
        for case in cases:  # interleaved: every method on the same prompt, in turn
            seconds, logits = run_case(case, tokens, chunk)
            lp = _logprobs(logits)
            if ref is None:
                ref = lp
            case.top1.append(bool(lp.argmax() == ref.argmax()))
            case.kl.append(float((np.exp(ref) * (ref - lp)).sum()))
            if r >= warmup:
                case.times.append(seconds)
            print(f"  rep {r}{' (warm-up)' if r < warmup else ''} {case.label}: {seconds:.3f} s", flush=True)


def table(cases: list[Case]) -> str:
    base = cases[0]
    t_base = statistics.median(base.times)
    rows = [
        "| method | token-layers computed | FLOPs-predicted speedup | TTFT median (s) | measured speedup "
        "| realised / predicted | first token = base | KL(base ‖ method) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        t = statistics.median(c.times)
        pred, meas = base.flops / c.flops, t_base / t
        share = f"{c.token_share:.0%}" if c.token_share is not None else "-"
        agree = f"{sum(c.top1)}/{len(c.top1)}"
        note = f" ({c.note})" if c.note else ""
        rows.append(f"| {c.label}{note} | {share} | {pred:.2f}x | {t:.3f} | {meas:.2f}x | {meas / pred:.0%} "
                    f"| {agree} | {statistics.mean(c.kl):.2e} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="OpenELM-270M", choices=SHAPES)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--prefill-step-size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--presets", default=",".join(p for p in PRESETS if p.startswith("L0.75")),
                    help="comma-separated lazy schedules (default: the L0.75 presets)")
    ap.add_argument("--no-kvp", action="store_true", help="leave out the KVP-LP rows")
    ap.add_argument("--no-rp", action="store_true", help="leave out the random-pruning row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    T, chunk = args.prompt_len, args.prefill_step_size
    cases = build_cases(args.shape, T, chunk, [p for p in args.presets.split(",") if p],
                        not args.no_kvp, not args.no_rp, args.seed)
    print(f"{args.shape} (random weights, float32), prompt {T} tokens, prefill chunk {chunk}, "
          f"{args.warmup} warm-up + {args.reps} reps interleaved", flush=True)
    measure(cases, T, chunk, args.reps, args.warmup, args.seed)
    command = "PYTHONPATH=. python bench/lazy_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = (f"`{command}`\n\n{args.shape}, random weights, float32, batch 1, prompt {T} tokens, prefill chunk {chunk}; "
            f"median of {args.reps} interleaved reps after {args.warmup} warm-up; "
            f"agreement over {args.warmup + args.reps} prompts.\n\n")
    raw = "\n".join(f"- {c.label}: " + ", ".join(f"{t:.3f}" for t in c.times) + " s" for c in cases)
    text = head + table(cases) + "\n\nTTFT of each timed rep, in run order:\n" + raw
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
