"""How much of a CPU prefill is the attention softmax? (why TTFT speedups fall short of FLOPs ratios)

    python -m bench.softmax_share [--prompt-length 1024] [--repetitions 3] [--out FILE.md]

FLOPs count matmuls; MLX's CPU backend runs the softmax's exps about as slowly as a small matmul
per score, and an auxiliary model has a larger share of attention scores than of FLOPs. This times
the cache fill (prefill of T-1 tokens, chunk 256, float32, batch 1) of the paper's OpenELM-1.1B base
and its 270M auxiliary (random weights) with three attention kernels, interleaved after a warm-up:

- ``mlx-fast``: ``mx.fast.scaled_dot_product_attention``, what mlx-lm and kvp-mlx run;
- ``composite``: the same attention from plain ops (scores, causal mask, ``mx.softmax``, values);
- ``no-softmax``: the same matmuls with the mask and softmax replaced by a scale (wrong values; for
  timing only).

``composite - no-softmax`` is the softmax's (and mask's) cost; the table gives the speedup the
auxiliary's cache fill would have over the base's with and without it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import mlx_lm.models.openelm as openelm

from bench.models import build_pairs
from bench.timing import Case, run_interleaved
from kvp_mlx.flops import cache_fill_flops, cache_fill_scores, model_shape
from kvp_mlx.methods.base import fill_cache

CHUNK = 256


def _grouped(queries: mx.array, keys: mx.array, values: mx.array):
    b, h, q_len, d = queries.shape
    kv_heads = keys.shape[1]
    q = queries.reshape(b, kv_heads, h // kv_heads, q_len, d)
    return q, keys[:, :, None], values[:, :, None], (b, h, q_len, d)


def composite_attention(queries, keys, values, cache, scale, mask, sinks=None):
    q, k, v, shape = _grouped(queries, keys, values)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    q_len, k_len = scores.shape[-2:]
    if q_len > 1:  # causal, the queries being the last q_len positions
        rows = mx.arange(k_len - q_len, k_len)[:, None]
        scores = mx.where(mx.arange(k_len)[None] <= rows, scores, mx.array(-mx.inf, scores.dtype))
    return (mx.softmax(scores, axis=-1, precise=True) @ v).reshape(shape)


def no_softmax_attention(queries, keys, values, cache, scale, mask, sinks=None):
    q, k, v, shape = _grouped(queries, keys, values)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    return ((scores * (1.0 / scores.shape[-1])) @ v).reshape(shape)


KERNELS = {
    "mlx-fast": openelm.scaled_dot_product_attention,
    "composite": composite_attention,
    "no-softmax": no_softmax_attention,
}


def check_composite() -> float:
    """Max |composite - mlx-fast| on a chunk after a cached prefix (grouped heads, causal)."""
    keys = [mx.random.normal(shape, key=mx.random.key(i)) for i, shape in
            enumerate([(1, 4, 8, 64), (1, 2, 24, 64), (1, 2, 24, 64)])]
    fast = mx.fast.scaled_dot_product_attention(*keys, scale=0.125, mask="causal")
    return float(mx.abs(composite_attention(keys[0], keys[1], keys[2], None, 0.125, "causal") - fast).max())


def time_fill(lm, tokens: mx.array, kernel: str) -> float:
    openelm.scaled_dot_product_attention = KERNELS[kernel]
    try:
        tic = time.perf_counter()
        fill_cache(lm, tokens, CHUNK)
        return time.perf_counter() - tic
    finally:
        openelm.scaled_dot_product_attention = KERNELS["mlx-fast"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-length", type=int, default=1024)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    diff = check_composite()
    if diff > 1e-4:
        raise SystemExit(f"composite attention differs from mx.fast's by {diff:.2e}")
    (group,) = build_pairs(["kvp-c-270m"])
    aux_lm = group.variants["OpenELM-270M"].aux
    assert aux_lm is not None
    models = {"base (OpenELM-1.1B)": group.base, "aux (OpenELM-270M)": aux_lm}
    T = args.prompt_length
    tokens = mx.random.randint(0, group.vocab_size, (1, T - 1), key=mx.random.key(0))
    keys = [(m, k) for m in models for k in KERNELS]
    # mypy cannot infer a lambda with default arguments
    cases = [Case(f"{m} {k}", lambda m=m, k=k: time_fill(models[m], tokens, k)) for m, k in keys]  # type: ignore[misc]
    run_interleaved(cases, warmup=1, repetitions=args.repetitions)
    med: dict[tuple[str, str], float] = {key: case.median for key, case in zip(keys, cases)}  # type: ignore[misc]  # all ran
    shapes = {m: model_shape(lm) for m, lm in models.items()}
    base, aux = list(models)
    lines = [
        f"# Softmax share of the CPU cache fill (T-1 = {T - 1} tokens, chunk {CHUNK}, float32, batch 1)", "",
        f"`python -m bench.softmax_share --prompt-length {T} --repetitions {args.repetitions}`; "
        f"median of {args.repetitions} interleaved repetitions after a warm-up; random weights.", "",
        "| model | GFLOPs | scores (M) | mlx-fast (s) | composite (s) | no-softmax (s) | softmax+mask (s) | "
        "softmax share | ns per score |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        flops = cache_fill_flops(shapes[m], T - 1, CHUNK) / 1e9
        scores = cache_fill_scores(shapes[m], T - 1, CHUNK)
        soft = med[(m, "composite")] - med[(m, "no-softmax")]
        lines.append(f"| {m} | {flops:.0f} | {scores / 1e6:.1f} | {med[(m, 'mlx-fast')]:.3f} | "
                     f"{med[(m, 'composite')]:.3f} | {med[(m, 'no-softmax')]:.3f} | {soft:.3f} | "
                     f"{soft / med[(m, 'composite')]:.0%} | {soft / scores * 1e9:.1f} |")
    flops_ratio = cache_fill_flops(shapes[base], T - 1, CHUNK) / cache_fill_flops(shapes[aux], T - 1, CHUNK)
    with_soft = med[(base, "mlx-fast")] / med[(aux, "mlx-fast")]
    without = med[(base, "no-softmax")] / med[(aux, "no-softmax")]
    lines += [
        "",
        f"Cache fill base / aux: FLOPs {flops_ratio:.2f}x; measured with MLX's attention {with_soft:.2f}x "
        f"({with_soft / flops_ratio:.0%} of FLOPs); without the softmax {without:.2f}x ({without / flops_ratio:.0%}).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
