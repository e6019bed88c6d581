"""Benchmark output: the JSON record (every sample, the environment), a markdown table, PNG plots.

Plots need matplotlib (``pip install "kvp-mlx[bench]"``); without it the JSON and markdown are
still written and :func:`write_plots` says what is missing.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from datetime import datetime
from pathlib import Path

SCHEMA = "kvp-mlx-bench/1"


def default_out_dir(root: str | Path = "bench/results") -> Path:
    return Path(root) / f"{datetime.now():%Y-%m-%d}-{socket.gethostname()}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def result_envelope(schema: str, name: str, started, tic: float, command: str, load_before, settings: dict,
                    runs: list) -> dict:
    """The facts every benchmark result records around its runs: when, where, how, under what load."""
    import time

    from kvp_mlx.runtime_env import env_report

    return {
        "schema": schema,
        "name": name,
        "created": started.isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - tic,
        "host": socket.gethostname(),
        "command": command,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "environment": {**env_report(), "cpu": cpu_model()},
        "settings": settings,
        "runs": runs,
    }


def write_json(result: dict, path: Path) -> Path:
    path.write_text(json.dumps(result, indent=1))
    return path


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    env, st = result["environment"], result["settings"]
    lines = [
        f"# kvp-mlx TTFT benchmark: {result['name']}",
        "",
        f"{result['created']} on {result['host']}; {env.get('cpu', '?')} ({env.get('cpu cores', '?')} cores); "
        f"MLX {env.get('mlx', '?')}, mlx-lm {env.get('mlx-lm', '?')}; BLAS: {env.get('blas', '?')}.",
        f"Prefill step size {st['prefill_step_size']} for every method; {st['warmup']} warm-up and "
        f"{st['repetitions']} timed repetitions per case, cases interleaved (rotating order); "
        f"load average before {result.get('load_average_before')}, after {result.get('load_average_after')}; "
        f"{result.get('duration_s', 0):.0f} s in all.",
        f"Command: `{result['command']}`",
        "",
        "TTFT = prompt token ids ready -> first token sampled and evaluated. Speedups are over `base` "
        "(median / median); *FLOPs speedup* is the speedup FLOPs predict; *realised* = measured / FLOPs speedup. "
        "*Scores* counts attention scores (query-key pairs x heads, masked ones included): each costs an exp "
        "in the unfused softmax, which MLX's CPU backend runs far slower than matmul FLOPs.",
        "",
        "| model | device | dtype | T | B | case | TTFT median (s) | min-max (s) | GFLOPs | scores (M) | speedup "
        "| FLOPs speedup | realised |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for c in run["cases"]:
            lines.append(
                f"| {run['model']} | {run['device']} | {run['dtype']} | {run['prompt_tokens']} | {run['batch']} "
                f"| {c['label']} | {_fmt(c['median_s'], '.3f')} "
                f"| {_fmt(c['min_s'], '.3f')}-{_fmt(c['max_s'], '.3f')} "
                f"| {_fmt(c['flops'] / 1e9 if c['flops'] else None, '.4g')} "
                f"| {_fmt(c['attention_scores'] / 1e6 if c.get('attention_scores') else None, '.4g')} "
                f"| {_fmt(c['speedup_measured'], '.2f')} | {_fmt(c['speedup_flops'], '.2f')} "
                f"| {_fmt(c['realised'] * 100 if c['realised'] else None, '.0f')}{'%' if c['realised'] else ''} |"
            )
    check_rows = [(run, ch) for run in result["runs"] for ch in run["checks"]]
    if check_rows:
        lines += ["", "## Checks", "",
                  "*value*: median over repetitions of the ratio of that repetition's samples (they ran back "
                  "to back, so the ratio cancels most load drift); the ratio of the medians is beside it.", "",
                  "| model | T | B | check | value | ratio of medians | passed |", "|---|---|---|---|---|---|---|"]
        for run, ch in check_rows:
            lines.append(f"| {run['model']} | {run['prompt_tokens']} | {run['batch']} | {ch['check']} "
                         f"| {_fmt(ch['value'], '.3f')} | {_fmt(ch.get('ratio_of_medians'), '.3f')} "
                         f"| {'yes' if ch['passed'] else '**no**'} |")
    skipped = [(run, s) for run in result["runs"] for s in run["skipped"]] + [
        (None, s) for s in result.get("skipped", [])
    ]
    if skipped:
        lines += ["", "## Skipped", ""]
        seen = set()
        for _run, s in skipped:
            key = (s["label"], s["reason"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- `{s['label']}`: {s['reason']}")
    lines += ["", "Case kinds: `mlx-lm` is plain mlx-lm (`generate_step`, the span `stream_generate` "
              "reports as prompt time; it dispatches the second token's decode step before materialising the "
              "first, and on MLX's CPU backend the first token then waits for about one more decode step); "
              "`aux-prefill[A]` fills auxiliary A's cache with T-1 tokens; "
              "`base-step` is one base decode step over T-1 cached positions.", ""]
    return "\n".join(lines)


def write_markdown(result: dict, path: Path) -> Path:
    path.write_text(markdown(result))
    return path


def _series(result: dict) -> dict[tuple[str, str, int], dict[str, list[tuple[int, dict]]]]:
    """(model, device, batch) -> case label -> [(prompt tokens, case record)] sorted by length."""
    out: dict = {}
    for run in result["runs"]:
        panel = out.setdefault((run["model"], run["device"], run["batch"]), {})
        for c in run["cases"]:
            if c["median_s"] is not None:
                panel.setdefault(c["label"], []).append((run["prompt_tokens"], c))
    for panel in out.values():
        for points in panel.values():
            points.sort(key=lambda p: p[0])
    return out


def write_plots(result: dict, out_dir: Path, name: str) -> tuple[list[Path], str | None]:
    """TTFT vs prompt length per method, and measured vs FLOPs-predicted speedup.

    Returns (files written, a note when plots could not be made).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots need matplotlib: pip install matplotlib (or pip install 'kvp-mlx[bench]')"
    files = []
    series = _series(result)
    if not series:
        return [], "no timed cases to plot"
    labels = list(dict.fromkeys(c["label"] for run in result["runs"] for c in run["cases"]))
    palette = [plt.get_cmap("tab10")(i) for i in range(10)]  # the tab10 colours, typed the same with or without stubs
    color = {label: palette[i % len(palette)] for i, label in enumerate(labels)}  # same colour in every panel
    fig, axes = plt.subplots(1, len(series), figsize=(6.5 * len(series), 4.8), squeeze=False)
    for ax, ((model, device, batch), panel) in zip(axes[0], series.items()):
        for label, points in panel.items():
            xs = [t for t, _ in points]
            ys = [c["median_s"] for _, c in points]
            err = [[c["median_s"] - c["min_s"] for _, c in points], [c["max_s"] - c["median_s"] for _, c in points]]
            style = "--" if points[0][1]["kind"] == "component" else "-"
            ax.errorbar(xs, ys, yerr=err, fmt=style + "o", capsize=3, label=label, markersize=4, color=color[label])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("TTFT (s), median; bars: min-max")
        ax.set_title(f"TTFT vs prompt length: {model}, batch {batch} ({device})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"{name}-ttft.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)

    speedups = [
        (run, c) for run in result["runs"] for c in run["cases"]
        if c["speedup_measured"] is not None and c["speedup_flops"] is not None and c["label"] != "base"
    ]
    if speedups:
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
        hi = max(max(c["speedup_flops"], c["speedup_measured"]) for _, c in speedups) * 1.15
        ax.plot([0, hi], [0, hi], "k-", lw=1, label="measured = FLOPs-predicted")
        ax.plot([0, hi], [0, 0.85 * hi], "k:", lw=1, label="85% of FLOPs-predicted")
        for label in dict.fromkeys(c["label"] for _, c in speedups):
            sel = [(run, c) for run, c in speedups if c["label"] == label]
            ax.scatter([c["speedup_flops"] for _, c in sel], [c["speedup_measured"] for _, c in sel], label=label,
                       color=color[label])
            for run, c in sel:
                ax.annotate(f"T={run['prompt_tokens']},B={run['batch']}", (c["speedup_flops"], c["speedup_measured"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_xlabel("FLOPs-predicted TTFT speedup over base")
        ax.set_ylabel("measured TTFT speedup over base (median)")
        ax.set_title("Measured vs FLOPs-predicted TTFT speedup over base", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}-speedup.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files, None
