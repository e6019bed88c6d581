"""Peak KV memory of EpiCache's block-wise prefill vs full KV on synthetic histories.

A small random llama-architecture model; histories of random tokens; budget M entries per head per
layer, block B. Prints and writes (bench/results/epicache/memory.json) the peak slots per head, the
peak bytes the cache held, MLX's peak memory and the time, per history length and policy.

    python -m bench.epicache_memory --lengths 4096 16384 65536 --budget 1024 --block 512
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import kvp_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from kvp_mlx import testing as mb
from kvp_mlx.epicache.policies.baselines import KVZIP_QUERY
from kvp_mlx.epicache.prefill import PromptScorer, build_memory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--full-up-to", type=int, default=65536, help="longest history to also run full KV on")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "epicache" / "memory.json"))
    args = p.parse_args(argv)
    cfg = mb.tiny_config("llama", n_layers=args.layers, vocab_size=512)
    cfg["max_position_embeddings"] = max(args.lengths) + 1024
    model = mb.build_model(cfg, seed=0)
    scorer = PromptScorer(tuple(ord(c) % 512 for c in KVZIP_QUERY))
    rows = []
    for n in args.lengths:
        tokens = np.random.default_rng(n).integers(0, 512, n).tolist()
        runs = [("epicache-block", args.budget)] + ([("full", None)] if n <= args.full_up_to else [])
        for name, budget in runs:
            mx.clear_cache()
            mx.reset_peak_memory()
            tic = time.perf_counter()
            mem = build_memory(model, tokens, budget, scorer if budget else None, block=args.block, level="pair")
            row = {"history": n, "policy": name, "budget": budget, "block": args.block,
                   "peak_slots_per_head": mem.peak_slots, "peak_kv_bytes": mem.peak_kv_bytes,
                   "final_kv_bytes": mem.kv_bytes(), "mlx_peak_bytes": int(mx.get_peak_memory()),
                   "seconds": round(time.perf_counter() - tic, 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del mem
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": cfg, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
