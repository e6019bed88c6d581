"""Accuracy versus TTFT: every method and preset as a point, the Pareto frontier marked.

    python -m bench.pareto [--toyworld models/toyworld] [--out bench/results/pareto]

Accuracy is the accuracy report's (bench/accuracy.py): teacher-forced next-token accuracy and mean
log-likelihood of HumanEval's canonical solutions given their prompts, the prompt's cache filled by
the method. TTFT is measured on the same models, side by side (cases interleaved, medians), on the
set's prompts of median length; TTFT FLOPs are the methods' declared costs (mean per prompt).

With a toy-world folder (make toyworld) the points are bench/accuracy.py's ENTRIES. Without one,
the embedded demo model (the toy world's KVP-C) gives base, kvp-C, aux-only (its auxiliary alone),
the LazyLLM presets and rp; the toy world's other models (kvp-LP, LP-only, the predictor
ablations) are then missing, and the outputs say so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx

from bench.accuracy import ENTRIES, Entry, humaneval_samples, score
from bench.timing import Case, run_interleaved
from kvp_mlx.methods import run_prefill
from kvp_mlx.model import load

DEMO_ENTRIES = (
    Entry("base", "", "base"),
    Entry("kvp-C", "", "kvp"),
    Entry("aux-only", "", "aux"),
    *(
        Entry(f"LazyLLM {p}", "", "lazy", (("schedule", p),))
        for p in ("L0.75-0.75", "L0.75-0.5", "L0.75-0.25", "L0.75-0.1")
    ),
    Entry("rp (keep 0.5)", "", "rp", (("keep", 0.5),)),
)
MISSING_ON_DEMO = ("kvp-LP", "LP-only", "kvp-C ridge-only (--steps 0)", "kvp-C random init (--steps 0)")


def pareto_front(points: list[dict], x: str, y: str = "accuracy") -> list[str]:
    """Labels of the points no other point beats: lower ``x`` and higher ``y`` (ties: not beaten)."""
    front = []
    for p in points:
        dominated = any(q[x] <= p[x] and q[y] >= p[y] and (q[x] < p[x] or q[y] > p[y]) for q in points)
        if not dominated:
            front.append(p["label"])
    return front


def measure_ttft(models: dict, entries, prompts: list[list[int]], warmup: int, repetitions: int) -> dict[str, dict]:
    """Median TTFT per entry over ``prompts`` (each repetition runs every prompt), interleaved."""

    def measure_fn(model, e: Entry):
        options = dict(e.options)
        arrays = [mx.array([p]) for p in prompts]
        mx.eval(arrays)

        def measure() -> float:
            total = 0.0
            for tokens in arrays:
                tic = time.perf_counter()
                result = run_prefill(model, tokens, e.method, prefill_step_size=2048, **options)
                assert result.logits is not None  # one process: the logits are here
                mx.eval(mx.argmax(result.logits, axis=-1))
                total += time.perf_counter() - tic
            return total / len(arrays)

        return measure

    cases = [Case(e.label, measure_fn(models[e.directory], e), method=e.method) for e in entries]
    run_interleaved(cases, warmup, repetitions)
    return {c.label: {"median_s": c.median, "samples_s": c.samples} for c in cases}


def run(toyworld: Path | None, out: Path, n_prompts: int, warmup: int, repetitions: int, max_samples: int) -> dict:
    if toyworld is not None:
        entries = ENTRIES
        models = {e.directory: load(toyworld / e.directory) for e in entries}
        source, missing = f"toy world {toyworld}", []
    else:
        entries = DEMO_ENTRIES
        models = {"": load(None)}
        source, missing = "embedded demo model (kvp_mlx/default_model: the toy world's KVP-C)", list(MISSING_ON_DEMO)
    tokenizer = next(iter(models.values())).tokenizer
    samples = humaneval_samples(tokenizer)[:max_samples]
    rows = []
    for e in entries:
        r = score(models[e.directory], e.method, samples, dict(e.options))
        rows.append({"label": e.label, "method": e.method, "options": dict(e.options), "directory": e.directory, **r})
        print(
            f"{e.label:32s} acc {r['accuracy']:.4f} loglik {r['mean_loglik']:.4f} FLOPs {r['ttft_flops'] / 1e6:.1f} M",
            flush=True,
        )
    by_len = sorted(samples, key=lambda s: len(s[0]))
    mid = len(by_len) // 2
    prompts = [p for p, _ in by_len[max(0, mid - n_prompts // 2) : mid - n_prompts // 2 + n_prompts]]
    ttft = measure_ttft(models, entries, prompts, warmup, repetitions)
    for row in rows:
        row.update({"ttft_s": ttft[row["label"]]["median_s"], "ttft_samples_s": ttft[row["label"]]["samples_s"]})
    from bench.report import cpu_model, load_average
    from kvp_mlx.runtime_env import env_report

    result = {
        "source": source,
        "set": "HumanEval (prompt -> canonical solution)",
        "samples": len(samples),
        "timing": {
            "prompts": len(prompts),
            "prompt_tokens": [len(p) for p in prompts],
            "warmup": warmup,
            "repetitions": repetitions,
            "load_average_after": load_average(),
        },
        "environment": {**env_report(), "cpu": cpu_model()},
        "missing": missing,
        "rows": rows,
        "frontier_ttft": pareto_front(rows, "ttft_s"),
        "frontier_flops": pareto_front(rows, "ttft_flops"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(result, indent=1))
    (out / "pareto.md").write_text(markdown(result))
    plot(result, out / "pareto.png")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    t = result["timing"]
    lines = [
        "# Accuracy vs TTFT (Pareto)",
        "",
        f"Models: {result['source']}. Accuracy: teacher-forced next-token accuracy on {result['set']}, "
        f"{result['samples']} problems (bench/accuracy.py). TTFT: median over {t['repetitions']} interleaved "
        f"repetitions (after {t['warmup']} warm-up) of the mean over {t['prompts']} prompts of "
        f"{min(t['prompt_tokens'])}-{max(t['prompt_tokens'])} tokens from the same set; load average after "
        f"{t['load_average_after']} (a shared 2-core machine). "
        "TTFT FLOPs: the methods' declared costs, mean per prompt.",
        "",
        "| method | next-token accuracy | mean log-likelihood | TTFT (ms) | TTFT GFLOPs "
        "| frontier (TTFT) | frontier (FLOPs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['accuracy']:.4f} | {r['mean_loglik']:.4f} | {r['ttft_s'] * 1e3:.2f} "
            f"| {r['ttft_flops'] / 1e9:.4f} | {'yes' if r['label'] in result['frontier_ttft'] else ''} "
            f"| {'yes' if r['label'] in result['frontier_flops'] else ''} |"
        )
    lines += [
        "",
        f"Pareto frontier, accuracy vs measured TTFT: {', '.join(result['frontier_ttft'])}.",
        f"Pareto frontier, accuracy vs TTFT FLOPs: {', '.join(result['frontier_flops'])}.",
    ]
    if result["missing"]:
        lines += [
            "",
            f"Missing points: {', '.join(result['missing'])}. They need the toy world's other trained "
            "models (models/toyworld, `make toyworld`, about 80 minutes on 2 idle cores), which were not "
            "built on the machine that made this run; rerun with `--toyworld models/toyworld` to add them.",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: the plot needs matplotlib (pip install 'kvp-mlx[bench]')")
        return None
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, front, xlabel, scale in (
        (axes[0], "ttft_s", result["frontier_ttft"], "TTFT (ms, measured median)", 1e3),
        (axes[1], "ttft_flops", result["frontier_flops"], "TTFT GFLOPs (declared cost)", 1e-9),
    ):
        for r in rows:
            on = r["label"] in front
            ax.scatter(
                r[key] * scale,
                r["accuracy"],
                s=60 if on else 30,
                marker="o" if on else "x",
                color="tab:red" if on else "tab:blue",
            )
            ax.annotate(
                r["label"], (r[key] * scale, r["accuracy"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
        pts = sorted((r[key] * scale, r["accuracy"]) for r in rows if r["label"] in front)
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:red", lw=1, label="Pareto frontier")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("next-token accuracy (HumanEval, teacher-forced)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("Accuracy vs measured TTFT", fontsize=10)
    axes[1].set_title("Accuracy vs TTFT FLOPs", fontsize=10)
    fig.suptitle(f"Accuracy vs TTFT, every method and preset: {result['source']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toyworld", help="toy-world folder (make toyworld); default: the embedded demo model")
    parser.add_argument("--out", default="bench/results/pareto", help="where pareto.{json,md,png} go")
    parser.add_argument("--prompts", type=int, default=8, help="prompts timed per repetition")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repetitions", "-n", type=int, default=7)
    parser.add_argument("--max-samples", type=int, default=164, help="HumanEval problems scored")
    args = parser.parse_args(argv)
    run(
        Path(args.toyworld) if args.toyworld else None,
        Path(args.out),
        args.prompts,
        args.warmup,
        args.repetitions,
        args.max_samples,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
