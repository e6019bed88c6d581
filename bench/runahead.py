"""Measure KV-Runahead's time to first token with N local ranks (a ring on 127.0.0.1), against
single-process base prefill, and predict it for more ranks and longer prompts from a cost model.

:func:`run_runahead_bench` (the ``python -m bench.runahead`` command) works in three steps:

1. calibrate a :class:`CostModel` of the model on this machine, with the BLAS threads one rank
   gets, and turn it into a split table (every rank then reads the same table);
2. start N ranks of this module (``python -m bench.runahead --as-rank ...``); each loads the model
   and runs, after one warm-up round, ``repeats`` rounds of the variants in rotating order:
   ``base`` (the last rank alone with all BLAS threads while the others wait), ``even`` and
   ``balanced`` (all ranks, the BLAS threads split between them). TTFT is measured on the last
   rank from a barrier to the first-token logits;
3. read the last rank's timings: medians and ratios.

While the last rank runs ``base``, or finishes a runahead prefill the others are done with, the
other ranks sleep on a file flag, not in an MLX barrier (a rank waiting in the ring backend's
receive keeps about half a core busy, which would slow the measured rank on shared cores).

On a machine with fewer cores than ranks x threads the ranks share cores, so the measured speedup
says little about a real multi-device run; exactness and the cost model are the point there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.runtime_env import blas_threads, set_blas_threads
from kvp_mlx.runahead.group import barrier, guarded, join_group, launch_local, python_module_argv
from bench.command import run_command
from kvp_mlx.errors import KVPError, exit_status
from kvp_mlx.runahead.split import (
    CostModel, SplitTable, balanced_split, even_split, measure_cost_model, pipeline_time, single_time, tsp_time,
)

VARIANTS = ("base", "even", "balanced")
REPO = Path(__file__).resolve().parent.parent  # the ranks import this module from the repository
RANK_FLAG = "--as-rank"  # argv of a rank started by run_runahead_bench
TABLE_LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class RunaheadBenchResult:
    ranks: int
    prompt_tokens: int
    repeats: int
    threads_per_rank: int
    ttft_s: dict[str, list[float]]  # variant -> TTFT of each timed round (last rank)
    bounds: dict[str, list[int]]  # even / balanced split used
    predicted_s: dict[str, float]  # the calibrated cost model's prediction per variant
    cost_model: dict = field(default_factory=dict)
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and at the end

    def median(self, variant: str) -> float:
        return statistics.median(self.ttft_s[variant])

    def summary(self) -> str:
        bandwidth, latency = self.cost_model["link_bytes_per_s"], self.cost_model["link_latency_s"]
        lines = [f"KV-Runahead, {self.ranks} local ranks ({self.threads_per_rank} BLAS thread(s) each), "
                 f"{self.prompt_tokens}-token prompt, median of {self.repeats} rounds after a warm-up; "
                 f"ring link measured {bandwidth / 1e9:.2f} GB/s, {latency * 1e3:.2f} ms latency; "
                 f"load average {self.load_average[0]:.1f} -> {self.load_average[1]:.1f} on {os.cpu_count()} cores:"]
        base = self.median("base")
        for v in VARIANTS:
            if v in self.ttft_s:
                split = f"  split {self.bounds[v]}" if v in self.bounds else ""
                pred = self.predicted_s.get(v)
                pred_text = f"  (cost model: {pred * 1000:.0f} ms)" if pred else ""
                lines.append(f"  {v:9s} TTFT {self.median(v) * 1000:8.1f} ms   speedup vs base "
                             f"{base / self.median(v):5.2f}x{pred_text}{split}")
        if "even" in self.ttft_s and "balanced" in self.ttft_s:
            lines.append(f"  balanced vs even: {self.median('even') / self.median('balanced'):.2f}x")
        return "\n".join(lines)


def openelm_shape_config(name: str, vocab_size: int = 32000, n_layers: int | None = None) -> dict:
    """mlx-lm config of a named corenet OpenELM shape (e.g. OpenELM-270M), optionally its first layers."""
    from kvp_mlx.convert.corenet_config import named_config

    config = named_config(name, vocab_size).to_mlx_config()
    if n_layers is not None:
        config["num_transformer_layers"] = n_layers
        for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            config[key] = config[key][:n_layers]
    return config


def build_bench_model(directory: str | Path, shape: str = "OpenELM-270M", n_layers: int | None = None,
                      vocab_size: int = 32000, seed: int = 0) -> Path:
    """A random-weight mlx-lm directory of an OpenELM shape (timing needs no trained weights)."""
    from kvp_mlx import testing as mb

    directory = Path(directory)
    config = openelm_shape_config(shape, vocab_size, n_layers)
    from kvp_mlx.tokenizer_files import pad_vocabulary

    tok = mb.build_byte_tokenizer(directory / "_tokenizer", mb.default_tokenizer_texts()[:4], 512)
    pad_vocabulary(tok, vocab_size)  # the embedding is the real model's size: cover it (loading checks)
    mb.save_lm_dir(directory, mb.build_model(config, seed=seed), config, tok)
    return directory


def _prompt(vocab_size: int, n_tokens: int) -> mx.array:
    return mx.random.randint(0, vocab_size, (1, n_tokens), key=mx.random.key(1234))


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise KVPError(f"the last rank did not finish ({path.name}) within {timeout_s:g} s")
        time.sleep(0.005)


def measure_link(group: mx.distributed.Group, timeout_s: float, megabytes: int = 32) -> tuple[float, float]:
    """(bytes/s, one-way latency s) between ranks 0 and 1: small-message ping-pong and one large send."""
    rank = group.rank()
    small, big = mx.zeros((4,)), mx.zeros(((megabytes << 20) // 4,))
    mx.eval(small, big)
    latency = bandwidth = 0.0
    with guarded(f"rank {rank}: measuring the link", timeout_s):
        if rank < 2:
            other = 1 - rank
            tic = time.perf_counter()
            for _ in range(20):
                for sender in (0, 1):
                    if rank == sender:
                        mx.eval(mx.distributed.send(small, other, group=group))
                    else:
                        mx.eval(mx.distributed.recv_like(small, other, group=group))
            latency = (time.perf_counter() - tic) / 40
            tic = time.perf_counter()
            if rank == 0:
                mx.eval(mx.distributed.send(big, 1, group=group))
            else:
                mx.eval(mx.distributed.recv_like(big, 0, group=group))
            bandwidth = big.nbytes / max(time.perf_counter() - tic - latency, 1e-9)
        facts = mx.distributed.all_sum(mx.array([latency, bandwidth]) * (rank == 1), group=group)
        mx.eval(facts)
    return float(facts[1]), float(facts[0])


def run_rank(model_dir: str, n_tokens: int, repeats: int, variants: Sequence[str], table: str, out: str,
             threads: int, timeout_s: float) -> None:
    """One rank of the benchmark (started by :func:`run_runahead_bench`)."""
    from kvp_mlx.model import load
    from kvp_mlx.methods import run_prefill

    group = join_group(timeout_s)
    last = group.rank() == group.size() - 1
    model = load(model_dir)
    tokens = _prompt(model.base.args.vocab_size, n_tokens)
    times: dict[str, list[float]] = {v: [] for v in variants}
    bounds: dict[str, list[int]] = {}
    set_blas_threads(threads)
    link = measure_link(group, timeout_s)
    for round_index in range(repeats + 1):  # round 0 warms up
        order = list(variants[round_index % len(variants):]) + list(variants[: round_index % len(variants)])
        for variant in order:
            barrier(group, timeout_s)
            if variant == "base":
                done = Path(out).parent / f"base-done-{round_index}"
                if last:
                    set_blas_threads(os.cpu_count() or 1)
                    tic = time.perf_counter()
                    mx.eval(model.prefill(tokens, method="base").logits)
                    elapsed = time.perf_counter() - tic
                    done.touch()
                else:  # sleep meanwhile: a rank waiting in an MLX ring receive keeps a core busy
                    _wait_for(done, timeout_s)
            else:
                set_blas_threads(threads)
                barrier(group, timeout_s)
                tic = time.perf_counter()
                result = run_prefill(model, tokens, method="runahead", split=variant, split_table=table,
                                     timeout_s=timeout_s)
                elapsed = time.perf_counter() - tic  # the last rank's logits are evaluated
                bounds[variant] = result.info["bounds"]
                done = Path(out).parent / f"{variant}-done-{round_index}"
                if last:
                    done.touch()
                else:  # the others are done before the last rank: sleep, do not spin in a barrier
                    _wait_for(done, timeout_s)
            if round_index and last:
                times[variant].append(elapsed)
    if last:
        Path(out).write_text(json.dumps({"ttft_s": times, "bounds": bounds, "link": link}))


def run_runahead_bench(
    model_dir: str | Path,
    ranks: int = 2,
    prompt_tokens: int = 1024,
    repeats: int = 3,
    variants: Sequence[str] = VARIANTS,
    timeout_s: float = 600.0,
    save_table: str | Path | None = None,
) -> RunaheadBenchResult:
    """Calibrate, run ``ranks`` local ranks, and return the last rank's timings (see module doc)."""
    from kvp_mlx.model import load

    if ranks < 2:
        raise KVPError("the runahead benchmark needs at least 2 ranks")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise KVPError(f"unknown variants {sorted(unknown)} (choose from {', '.join(VARIANTS)})")
    threads = max(1, (os.cpu_count() or 1) // ranks)
    load_start = os.getloadavg()[0]
    model = load(model_dir)
    before = blas_threads()
    try:
        set_blas_threads(os.cpu_count() or 1)
        cost_alone = measure_cost_model(model.base)  # base prefill: one process with every thread
        set_blas_threads(threads)
        cost = measure_cost_model(model.base)  # one rank's work, as a rank runs it
    finally:
        if before is not None:
            set_blas_threads(before)
    table = SplitTable.from_cost_model(cost, ranks=sorted({2, 4, 8, ranks}), lengths=TABLE_LENGTHS,
                                       source=f"measured on {os.uname().nodename}, {threads} BLAS thread(s)")
    del model
    with tempfile.TemporaryDirectory(prefix="kvp-runahead-bench-") as work:
        table_path = Path(save_table) if save_table else Path(work) / "split_table.json"
        table.save(table_path)
        out = Path(work) / "result.json"
        argv = python_module_argv(
            "bench.runahead", RANK_FLAG, "--model", str(model_dir), "--prompt-tokens", str(prompt_tokens),
            "--repeats", str(repeats), "--variants", ",".join(variants), "--split-table", str(table_path),
            "--out", str(out), "--threads", str(threads), "--timeout", str(timeout_s),
        )
        env = {"OPENBLAS_NUM_THREADS": str(os.cpu_count() or 1),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        results = launch_local(ranks, argv, work, env=env,
                               timeout_s=timeout_s * 2)
        failed = [r for r in results if r.returncode != 0]
        if failed:
            raise KVPError(f"benchmark rank {failed[0].rank} failed (exit {failed[0].returncode}): "
                           f"{failed[0].stderr.strip()[-1500:]}")
        data = json.loads(out.read_text())
    cost = cost.with_link(*data["link"])
    predicted = {"base": single_time(prompt_tokens, cost_alone)}
    for v, b in data["bounds"].items():
        predicted[v] = pipeline_time(b, cost)
    return RunaheadBenchResult(ranks, prompt_tokens, repeats, threads, data["ttft_s"], data["bounds"], predicted,
                               asdict(cost), (load_start, os.getloadavg()[0]))


def predicted_speedups(cost: CostModel, ranks: Sequence[int] = (2, 4, 8),
                       lengths: Sequence[int] = (2048, 4096, 8192, 16384)) -> list[dict]:
    """Per (ranks, length): the cost model's runahead time (even and balanced split) against one
    process and against tensor + sequence parallelism on the same link."""
    rows = []
    for p in ranks:
        for n in lengths:
            balanced, even = pipeline_time(balanced_split(n, p, cost), cost), pipeline_time(even_split(n, p), cost)
            rows.append({"ranks": p, "tokens": n, "vs_single": single_time(n, cost) / balanced,
                         "even_vs_single": single_time(n, cost) / even, "vs_tsp": tsp_time(n, p, cost) / balanced})
    return rows


def llama2_7b_shape() -> nn.Module:
    """Llama-2-7B's shape with lazy (never materialised) weights, for FLOP counting."""
    from mlx_lm.models import llama

    return llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, vocab_size=32000,
    ))


# Scenarios for the Llama-2-7B prediction: (title, FLOP/s per rank, link bytes/s, link latency s).
SCENARIOS = [
    ("A100-class GPUs (150 TFLOP/s fp16), NVLink 3 (300 GB/s)", 150e12, 300e9, 5e-6),
    ("A100-class GPUs (150 TFLOP/s fp16), PCIe 4 x16 (25 GB/s)", 150e12, 25e9, 10e-6),
    ("Mac-class GPUs (20 TFLOP/s fp16), Thunderbolt (5 GB/s)", 20e12, 5e9, 50e-6),
    ("Mac-class GPUs (20 TFLOP/s fp16), 10 Gb Ethernet (1.25 GB/s)", 20e12, 1.25e9, 50e-6),
]


def prediction_tables(cost: CostModel) -> list[str]:
    """Predicted speedups for the measured model and for Llama-2-7B on Mac-class links (text lines)."""

    def table(title: str, model_cost) -> list[str]:
        rows = predicted_speedups(model_cost)
        out = [title, "  ranks  tokens   balanced/single  even/single  balanced vs TSP"]
        out += [f"  {r['ranks']:5d}  {r['tokens']:6d}   {r['vs_single']:14.2f}x  {r['even_vs_single']:10.2f}x"
                f"  {r['vs_tsp']:14.2f}x" for r in rows]
        return out

    lines = table("Predicted for the benchmarked model, cost model and ring link measured here:", cost)
    llama = llama2_7b_shape()
    for title, flops, bandwidth, latency in SCENARIOS:
        model_cost = CostModel.from_model(llama, flops_per_s=flops, dtype_bytes=2)
        lines += table(f"Predicted for Llama-2-7B on {title}:", model_cost.with_link(bandwidth, latency))
    return lines



def rank_main(argv: Sequence[str]) -> int:
    """One rank of the benchmark, as :func:`run_runahead_bench` starts it."""
    parser = argparse.ArgumentParser(description="one rank of python -m bench.runahead (internal)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-tokens", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--variants", required=True)
    parser.add_argument("--split-table", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    a = parser.parse_args(argv)
    run_rank(a.model, a.prompt_tokens, a.repeats, a.variants.split(","), a.split_table, a.out, a.threads, a.timeout)
    return 0


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

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [RANK_FLAG]:
        return exit_status(lambda: rank_main(argv[1:]))
    return run_command("python -m bench.runahead", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
