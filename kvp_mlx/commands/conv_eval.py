"""`kvp-mlx conv-eval`: answer a conversation set's questions from compressed memories (EpiCache and
its baselines): per-question F1 (the paper's normalisation), the mean, peak memory and time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvp_mlx.epicache.budgets import budgets_for
from kvp_mlx.epicache.episodes import load_embedder
from kvp_mlx.epicache.evaluate import QuestionResult, evaluate
from kvp_mlx.epicache.loaders import FORMATS, SCHEMAS, load_conversations
from kvp_mlx.epicache.policies import available_policies, describe_policies, get_policy
from kvp_mlx.epicache.prefill import LEVELS
from kvp_mlx.errors import KVPError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="the conversation file (one JSON file)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="its schema (listed below)")
    parser.add_argument("--model", help="a KV Prediction or mlx-lm model directory (default: the embedded demo model)")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    formats = "\n".join(f"  {name}: {schema}" for name, schema in SCHEMAS.items())
    parser.epilog = f"formats (--format):\n{formats}\n\nKV policies (--policy):\n" + describe_policies()
    parser.add_argument("--policy", default="epicache", metavar="P",
                        help=f"KV policy: {', '.join(available_policies())} (default epicache; listed below)")
    parser.add_argument("--budget", type=int, help="KV entries per head per layer (M); not for --policy full")
    parser.add_argument("--block", type=int, default=2048, help="prefill block size B (default 2048)")
    parser.add_argument("--episodes", type=int, default=4, help="episodes E for epicache (default 4)")
    parser.add_argument("--medoids", type=int, default=4, help="medoid windows per episode (default 4)")
    parser.add_argument("--window", type=int, default=4, help="utterances per episode window (default 4)")
    parser.add_argument("--level", default="pair", choices=LEVELS, help="eviction level (default pair)")
    parser.add_argument("--alpha", type=float, default=0.0,
                        help="per-layer budget sharpness from the model's profile (kvp-mlx epicache-profile); "
                        "0 = uniform (default)")
    parser.add_argument("--embedder", help="an mlx-lm model directory for episode embeddings (default: the "
                        "model's own token embeddings)")
    parser.add_argument("--kvp-build", action="store_true",
                        help="build the memories with the auxiliary model and the predictor instead of the base")
    parser.add_argument("--max-tokens", type=int, default=50, help="answer length (default 50)")
    parser.add_argument("--limit", type=int, help="answer at most this many questions")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", help="write the results here as JSON")


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.commands.output_paths import check_output_file
    from kvp_mlx.model import load

    if get_policy(args.policy, what="--policy").evicts and args.budget is None:
        raise KVPError(f"--policy {args.policy} needs --budget")
    if args.budget is not None and args.budget < 1:
        raise KVPError("--budget must be positive")
    if args.json:
        check_output_file(args.json, "--json")
    conversations = load_conversations(args.data, args.format)
    model = load(args.model, dtype=args.dtype)
    budget = None
    if args.budget is not None:
        budget = budgets_for(model.path, len(model.base.layers), args.budget, args.alpha)
    embedder = load_embedder(args.embedder) if args.embedder else None

    from kvp_mlx.progress import CountingBar

    questions = sum(len(c.questions) for c in conversations)
    bar = CountingBar(questions if args.limit is None else min(questions, args.limit), "questions", "q")

    def show(r: QuestionResult) -> None:  # the line on stdout; a bar over the questions on a terminal's stderr
        bar.advance(f"{r.conversation}\tF1 {r.f1:.3f}\tEM {r.em:.0f}\tepisode {r.episode}\t"
                    f"Q: {r.question!r}\tpred: {r.prediction!r}\tgold: {r.answer!r}")

    report = evaluate(model, conversations, args.policy, budget, block=args.block, level=args.level,
                      n_episodes=args.episodes, n_medoids=args.medoids, window=args.window, embedder=embedder,
                      kvp_build=args.kvp_build, max_tokens=args.max_tokens, limit=args.limit, on_result=show)
    bar.close()
    n = len(report.results)
    print(f"policy {args.policy}  budget {args.budget}  block {args.block}  questions {n}  "
          f"mean F1 {report.mean_f1:.4f}  EM {report.mean_em:.4f}")
    print(f"history tokens {report.history_tokens}  peak KV {report.peak_kv_bytes / 2**20:.2f} MiB  "
          f"peak memory {report.peak_memory_bytes / 2**20:.1f} MiB  build {report.build_seconds:.2f} s  "
          f"answers {report.answer_seconds:.2f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "policy": args.policy, "budget": args.budget, "block": args.block, "mean_f1": report.mean_f1,
            "mean_em": report.mean_em, "peak_kv_bytes": report.peak_kv_bytes,
            "peak_memory_bytes": report.peak_memory_bytes, "build_seconds": report.build_seconds,
            "answer_seconds": report.answer_seconds, "history_tokens": report.history_tokens,
            "results": [r.__dict__ for r in report.results],
        }, indent=2))
    return 0
