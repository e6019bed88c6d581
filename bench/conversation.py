"""The conversation profile of `python -m bench.ttft`: TTFT of a warm turn over a long history.

A :class:`kvp_mlx.Session` holds a history of H tokens (random token ids); a new message of N
tokens arrives. Cases, timed interleaved in one run (bench.timing):

- ``base-warm``: a base session reusing the cached history (what mlx-lm's prompt cache does): the
  base prefills the N new tokens.
- ``kvp-warm[A]``: a kvp session on the warm cache: auxiliary A catches up on the new tokens, the
  predictor fills their base positions, one base step.
- ``base-cold`` / ``kvp-cold[A]``: a fresh session re-prefilling everything (H + N tokens).
- ``repair[A]``: after a kvp warm turn (untimed), ``session.repair()`` recomputing the exact base
  K/V of the turn's predicted positions (the seconds it reports).

TTFT is ``GenerationResponse.ttft_s`` of the turn's first token (``max_tokens=1``): prompt ids
ready -> first token sampled and materialised. The warm sessions are built once, before the
clock: the base session prefills the history; the kvp session prefills it with KV Prediction and
then repairs it, so its base cache holds exact K/V of the history (as after an idle-time repair)
and its auxiliary cache holds the history too. After every sample the session is trimmed back to
the H history tokens (``session.trim``), so every warm turn and every repair starts from that same
state.
"""

from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from bench.cases import paired_ratio
from bench.timing import Case, run_interleaved
from kvp_mlx.errors import KVPError

from bench.ttft import PROFILE_NOTES, PROFILES

SCHEMA = "kvp-mlx-bench-conversation/1"
DEFAULTS = PROFILES["conversation"]
NOTE = PROFILE_NOTES["conversation"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- settings ----------------------------------------------------------------------------------


def make_settings(
    *, pairs: list[str] | None = None, models: list[str] | None = None, history_tokens: int | None = None,
    new_tokens: list[int] | None = None, dtype: str | None = None, repetitions: int | None = None,
    warmup: int | None = None, prefill_step_size: int = 256, seed: int = 0,
) -> dict:
    """Checked settings of the conversation profile; options left as None take its defaults."""
    from bench.models import PAIRS

    unknown = [p for p in pairs or [] if p not in PAIRS]
    if unknown:
        raise KVPError(f"unknown model pair(s) {', '.join(unknown)} (known: {', '.join(PAIRS)})")
    settings: dict = {
        "profile": "conversation",
        "pairs": pairs if pairs is not None else ([] if models else DEFAULTS["pairs"]),
        "models": list(models or []),
        "history_tokens": history_tokens if history_tokens is not None else DEFAULTS["history_tokens"],
        "new_tokens": new_tokens or DEFAULTS["new_tokens"],
        "dtype": dtype,
        "repetitions": repetitions if repetitions is not None else DEFAULTS["repetitions"],
        "warmup": max(1, warmup if warmup is not None else DEFAULTS["warmup"]),
        "prefill_step_size": prefill_step_size,
        "seed": seed,
    }
    from bench.ttft import check_common_settings

    check_common_settings(settings)
    if settings["history_tokens"] < 1:
        raise KVPError("--history-tokens must be at least 1")
    return settings


def equivalent_command(settings: dict) -> str:
    """A command line that reruns exactly these settings."""
    words = ["python", "-m", "bench.ttft", "--profile", "conversation"]
    if settings["pairs"]:
        words += ["--pairs", ",".join(settings["pairs"])]
    for path in settings["models"]:
        words += ["--model", path]
    words += ["--history-tokens", str(settings["history_tokens"]),
              "--new-tokens", ",".join(map(str, settings["new_tokens"]))]
    if settings["dtype"]:
        words += ["--dtype", settings["dtype"]]
    words += ["--repetitions", str(settings["repetitions"]), "--warmup", str(settings["warmup"]),
              "--prefill-step-size", str(settings["prefill_step_size"]), "--seed", str(settings["seed"])]
    return shlex.join(words)


# --- models without a tokenizer ------------------------------------------------------------------


class _IdDetokenizer:
    """Turns generated token ids into text as their decimal ids (a model with random weights has no
    vocabulary to spell them with)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self._segment = ""

    def add_token(self, token: int) -> None:
        self.tokens.append(int(token))
        self._segment += f" {int(token)}"

    def finalize(self) -> None:
        pass

    @property
    def last_segment(self) -> str:
        segment, self._segment = self._segment, ""
        return segment

    @property
    def text(self) -> str:
        return " ".join(map(str, self.tokens))


class IdTokenizer:
    """The tokenizer of a random-weight benchmark model: prompts are token ids (which a session
    passes through as they are), no chat template, no end-of-sequence token."""

    has_chat_template = False
    eos_token_ids: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """No vocabulary: text has no token ids (decoding asks for the newline's, for XTC sampling only)."""
        return []

    @property
    def detokenizer(self) -> _IdDetokenizer:
        return _IdDetokenizer()


def _with_tokenizer(model: Any) -> Any:
    from dataclasses import replace

    return model if model.tokenizer is not None else replace(model, tokenizer=IdTokenizer())


# --- cases -------------------------------------------------------------------------------------


def random_ids(vocab_size: int, n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab_size, size=n)]


def _first_token(session: Any, prompt: list[int]) -> Any:
    responses = list(session.stream_generate(prompt, max_tokens=1, temp=0.0))  # run to the end: the turn settles
    return responses[0]  # the first token's response carries the TTFT


def _turn_info(session: Any) -> dict:
    t = session.turns[-1]
    return {"reused_tokens": t.reused_tokens, "prefilled_tokens": t.prefilled_tokens,
            "predicted_positions": (t.predicted[1] - t.predicted[0]) if t.predicted else 0}


def _time_warm(session: Any, history: int, message: list[int], info: dict) -> Callable[[], float]:
    def measure() -> float:
        try:
            seconds = _first_token(session, message).ttft_s
            info.update(_turn_info(session))
        finally:
            session.trim(len(session.tokens) - history)  # back to the history alone
        return seconds

    return measure


def _time_cold(make_session: Callable[[], Any], prompt: list[int], info: dict) -> Callable[[], float]:
    def measure() -> float:
        session = make_session()  # fresh caches, outside the clock
        seconds = _first_token(session, prompt).ttft_s
        info.update(_turn_info(session))
        return seconds

    return measure


def _time_repair(session: Any, history: int, message: list[int], info: dict) -> Callable[[], float]:
    def measure() -> float:
        try:
            _first_token(session, message)  # the warm kvp turn, untimed
            report = session.repair()
            if not report.complete:
                raise KVPError("internal: the repair stopped before the end")
            info.update(start=report.start, end=report.end, positions=report.positions)
        finally:
            session.trim(len(session.tokens) - history)
        return report.seconds

    return measure


def build_cases(group: Any, settings: dict, log: Callable[[str], None]) -> tuple[list[Case], dict, list[dict]]:
    """The sessions (their history filled, outside the clock) and the timed cases of one group."""
    from kvp_mlx.conversation.session import Session

    H, chunk, seed = settings["history_tokens"], settings["prefill_step_size"], settings["seed"]
    history = random_ids(group.vocab_size, H, seed)
    messages = {n: random_ids(group.vocab_size, n, seed + 1 + i) for i, n in enumerate(settings["new_tokens"])}
    base_model = _with_tokenizer(group.base_only)
    kvp_models = {name: _with_tokenizer(m) for name, m in group.variants.items()}
    infos: dict[str, dict] = {}
    setup: list[dict] = []

    tic = time.perf_counter()
    base_session = Session(base_model, method="base", prefill_step_size=chunk)
    base_session.prefill(history)
    setup.append({"session": "base", "history": "base prefill", "seconds": time.perf_counter() - tic})
    kvp_sessions = {}
    for name, model in kvp_models.items():
        tic = time.perf_counter()
        s = Session(model, method="kvp", prefill_step_size=chunk)
        s.prefill(history)
        repaired = s.repair()
        assert repaired.complete and not s.predicted
        kvp_sessions[name] = s
        setup.append({"session": f"kvp[{name}]", "history": "kvp prefill, then repair (exact base K/V)",
                      "seconds": time.perf_counter() - tic})
    log("  sessions ready: " + ", ".join(f"{s['session']} {s['seconds']:.1f} s" for s in setup))

    cases: list[Case] = []

    def info(label: str, case: str, n: int) -> dict:
        infos[label] = {"case": case, "new_tokens": n}
        return infos[label]

    def add(label: str, case: str, aux: str | None, measure: Callable[[], float]) -> None:
        cases.append(Case(label, measure, kind=case, method="kvp" if aux else "base", aux=aux))

    def fresh(model: Any, method: str) -> Callable[[], Any]:
        return lambda: Session(model, method=method, prefill_step_size=chunk)

    for n, message in messages.items():
        label = f"base-warm N={n}"
        add(label, "base-warm", None, _time_warm(base_session, H, message, info(label, "base-warm", n)))
        for name, s in kvp_sessions.items():
            label = f"kvp-warm[{name}] N={n}"
            add(label, "kvp-warm", name, _time_warm(s, H, message, info(label, "kvp-warm", n)))
        label = f"base-cold N={n}"
        add(label, "base-cold", None, _time_cold(fresh(base_model, "base"), history + message,
                                                 info(label, "base-cold", n)))
        for name, model in kvp_models.items():
            label = f"kvp-cold[{name}] N={n}"
            add(label, "kvp-cold", name, _time_cold(fresh(model, "kvp"), history + message,
                                                    info(label, "kvp-cold", n)))
        for name, s in kvp_sessions.items():
            label = f"repair[{name}] N={n}"
            add(label, "repair", name, _time_repair(s, H, message, info(label, "repair", n)))
    return cases, infos, setup


def ratios(records: list[dict], new_tokens: list[int], aux_names: list[str]) -> list[dict]:
    """The derived ratios per new-message length: speedups (numerator / denominator, both TTFT) and
    the repair's seconds; ``value`` is the paired ratio (median over repetitions of the ratio of
    that repetition's samples), ``ratio_of_medians`` beside it."""
    med = {r["label"]: r["median_s"] for r in records}
    out = []

    def add(name: str, num: str, den: str, n: int) -> None:
        if not med.get(num) or not med.get(den):
            return
        out.append({"ratio": name, "new_tokens": n, "numerator": num, "denominator": den,
                    "value": paired_ratio(records, [num], [den]), "ratio_of_medians": med[num] / med[den]})

    for n in new_tokens:
        bw, bc = f"base-warm N={n}", f"base-cold N={n}"
        for a in aux_names:
            add("kvp-warm speedup over base-warm (base-warm / kvp-warm)", bw, f"kvp-warm[{a}] N={n}", n)
        add("base-warm speedup over base-cold (base-cold / base-warm)", bc, bw, n)
        for a in aux_names:
            kw, kc, rep = f"kvp-warm[{a}] N={n}", f"kvp-cold[{a}] N={n}", f"repair[{a}] N={n}"
            add("kvp-warm speedup over kvp-cold (kvp-cold / kvp-warm)", kc, kw, n)
            add("kvp-warm speedup over base-cold (base-cold / kvp-warm)", bc, kw, n)
            add("repair seconds over kvp-warm TTFT (repair / kvp-warm)", rep, kw, n)
            add("repair seconds over base-warm TTFT (repair / base-warm)", rep, bw, n)
    return out


def benchmark_group(group: Any, settings: dict, log: Callable[[str], None]) -> dict:
    """Time every case of one model group, interleaved; return its JSON record."""
    cases, infos, setup = build_cases(group, settings, log)
    run_interleaved(cases, settings["warmup"], settings["repetitions"], log)
    records = []
    for c in cases:
        info = infos[c.label]
        rec = {"label": c.label, "case": info["case"], "new_tokens": info["new_tokens"], "aux": c.aux,
               "method": c.method, "samples_s": c.samples, **c.summary(),
               "info": {k: v for k, v in info.items() if k not in ("case", "new_tokens")}}
        if c.skipped:
            rec["skipped"] = c.skipped
        records.append(rec)
    return {
        "model": group.name,
        "source": group.source,
        "history_tokens": settings["history_tokens"],
        "new_tokens": settings["new_tokens"],
        "prefill_step_size": settings["prefill_step_size"],
        "setup": setup,
        "cases": records,
        "ratios": ratios(records, settings["new_tokens"], list(group.variants)),
    }


def run_benchmark(settings: dict, out: Path | None = None, name: str | None = None, no_plots: bool = False) -> int:
    """Measure the conversation cases of every model and write OUT/NAME.{json,md} and NAME-ttft.png."""
    from bench import report
    from bench.models import build_pairs, load_group
    from kvp_mlx.runtime_env import dtype_name, resolve_dtype, set_device

    as_profile = not settings["models"] and all(settings[k] == v for k, v in DEFAULTS.items())
    _log((f"profile conversation: {NOTE}" if as_profile else "custom conversation run") + "; running: pairs "
         f"{','.join(settings['pairs']) or '-'}, models {','.join(settings['models']) or '-'}, history "
         f"{settings['history_tokens']} tokens, new messages {settings['new_tokens']} tokens, {settings['warmup']} "
         f"warm-up + {settings['repetitions']} repetitions, prefill step size {settings['prefill_step_size']}")
    started, load_before, tic = datetime.now(), report.load_average(), time.perf_counter()
    out = Path(out) if out else report.default_out_dir()
    set_device("cpu")
    dtype = resolve_dtype(settings["dtype"])
    groups = build_pairs(settings["pairs"], dtype, settings["seed"]) if settings["pairs"] else []
    groups += [load_group(path, settings["dtype"]) for path in settings["models"]]
    missing = [g.name for g in groups if not g.variants]
    if missing:
        raise KVPError(f"{', '.join(missing)} has no auxiliary model: the conversation profile compares kvp with base")
    _log(f"models ready in {time.perf_counter() - tic:.1f} s: "
         + "; ".join(f"{g.name} with {', '.join(g.variants)}" for g in groups))
    runs = []
    for group in groups:
        _log(f"{group.name}: history {settings['history_tokens']} tokens, new messages {settings['new_tokens']}")
        runs.append({"device": "cpu", "dtype": dtype_name(dtype), **benchmark_group(group, settings, _log)})
    del groups
    mx.clear_cache()
    name = name or "conversation"
    result = report.result_envelope(SCHEMA, name, started, tic, equivalent_command(settings), load_before,
                                    settings, runs)
    out.mkdir(parents=True, exist_ok=True)
    return write_outputs(result, out, name, no_plots)


def rerender(result: dict, out: Path, name: str, no_plots: bool = False) -> int:
    """Redo the ratios, markdown and plot of an earlier run's JSON (nothing is measured)."""
    for run in result["runs"]:
        aux_names = list(dict.fromkeys(c["aux"] for c in run["cases"] if c["aux"]))
        run["ratios"] = ratios(run["cases"], run["new_tokens"], aux_names)
    return write_outputs(result, out, name, no_plots)


# --- output ------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    env, st = result["environment"], result["settings"]
    lines = [
        f"# kvp-mlx conversation benchmark: {result['name']}",
        "",
        f"{result['created']} on {result['host']}; {env.get('cpu', '?')} ({env.get('cpu cores', '?')} cores); "
        f"MLX {env.get('mlx', '?')}, mlx-lm {env.get('mlx-lm', '?')}; BLAS: {env.get('blas', '?')}.",
        f"History {st['history_tokens']} tokens; prefill step size {st['prefill_step_size']}; {st['warmup']} warm-up "
        f"and {st['repetitions']} timed repetitions per case, cases interleaved (rotating order); load average "
        f"before {result.get('load_average_before')}, after {result.get('load_average_after')}; "
        f"{result.get('duration_s', 0):.0f} s in all.",
        f"Command: `{result['command']}`",
        "",
        "TTFT of a turn whose new message has N tokens (random ids), first token sampled and materialised "
        "(`GenerationResponse.ttft_s`). *warm*: a session already holding the history reuses it (base: prefills "
        "the N new tokens, as mlx-lm's prompt cache; kvp: the auxiliary catches up on them, the predictor fills "
        "their base positions, one base step). *cold*: a fresh session prefills history + message. *repair*: "
        "`session.repair()` after a kvp warm turn (seconds it reports: exact base K/V of the turn's predicted "
        "positions). The warm sessions hold exact K/V of the history (kvp: prefilled, then repaired) and are "
        "trimmed back to it after every sample.",
        "",
        "| model | dtype | H | N | case | TTFT median (s) | min-max (s) | reused | prefilled | predicted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for c in run["cases"]:
            info = c.get("info", {})
            predicted = info.get("predicted_positions", info.get("positions"))
            lines.append(
                f"| {run['model']} | {run['dtype']} | {run['history_tokens']} | {c['new_tokens']} | {c['label']} "
                f"| {_fmt(c['median_s'], '.3f')} | {_fmt(c['min_s'], '.3f')}-{_fmt(c['max_s'], '.3f')} "
                f"| {info.get('reused_tokens', '')} | {info.get('prefilled_tokens', '')} "
                f"| {'' if predicted is None else predicted}{' (repaired)' if c['case'] == 'repair' else ''} |"
            )
    rows = [(run, r) for run in result["runs"] for r in run["ratios"]]
    if rows:
        lines += ["", "## Ratios", "",
                  "*value*: median over repetitions of the ratio of that repetition's samples (they ran back to "
                  "back, so the ratio cancels most load drift); the ratio of the medians is beside it.", "",
                  "| model | N | ratio | value | ratio of medians |", "|---|---|---|---|---|"]
        for run, r in rows:
            lines.append(f"| {run['model']} | {r['new_tokens']} | {r['ratio']} | {_fmt(r['value'], '.2f')} "
                         f"| {_fmt(r['ratio_of_medians'], '.2f')} |")
    skipped = [c for run in result["runs"] for c in run["cases"] if c.get("skipped")]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- `{c['label']}`: {c['skipped']}" for c in skipped]
    lines.append("")
    return "\n".join(lines)


def write_plots(result: dict, out_dir: Path, name: str) -> tuple[list[Path], str | None]:
    """NAME-ttft.png: TTFT per case (bars, median; whiskers min-max), one group per message length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots need matplotlib: pip install matplotlib (or pip install 'kvp-mlx[bench]')"
    runs = [run for run in result["runs"] if any(c["median_s"] for c in run["cases"])]
    if not runs:
        return [], "no timed cases to plot"
    fig, axes = plt.subplots(1, len(runs), figsize=(7.5 * len(runs), 4.8), squeeze=False)
    palette = plt.get_cmap("tab10")
    for ax, run in zip(axes[0], runs):
        timed = [c for c in run["cases"] if c["median_s"]]
        kinds = list(dict.fromkeys(c["label"].rsplit(" N=", 1)[0] for c in timed))
        lengths = [n for n in run["new_tokens"] if any(c["new_tokens"] == n for c in timed)]
        width = 0.8 / max(len(kinds), 1)
        for k, kind in enumerate(kinds):
            points = [(i, c) for i, n in enumerate(lengths) for c in timed if c["label"] == f"{kind} N={n}"]
            xs = [i + (k - (len(kinds) - 1) / 2) * width for i, _ in points]
            ys = [c["median_s"] for _, c in points]
            err = [[c["median_s"] - c["min_s"] for _, c in points], [c["max_s"] - c["median_s"] for _, c in points]]
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=kind, color=palette(k % 10),
                   hatch="//" if kind.startswith("repair") else None)
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.2f}", (x, y), fontsize=6, ha="center", xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(lengths)), [f"new message: {n} tokens" for n in lengths])
        ax.set_yscale("log")
        ax.set_ylabel("seconds (TTFT; repair: its duration), median; bars: min-max")
        ax.set_title(f"Warm turn over {run['history_tokens']} tokens of history: {run['model']} ({run['dtype']})",
                     fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"{name}-ttft.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path], None


def write_outputs(result: dict, out: Path, name: str, no_plots: bool) -> int:
    """OUT/NAME.json, OUT/NAME.md and (unless no_plots) OUT/NAME-ttft.png; the table goes to stdout."""
    from bench import report

    md = out / f"{name}.md"
    md.write_text(markdown(result))
    files = [report.write_json(result, out / f"{name}.json"), md]
    note = None
    if not no_plots:
        plots, note = write_plots(result, out, name)
        files += plots
    print(markdown(result))
    for f in files:
        print(f"wrote {f}")
    if note:
        print(f"note: {note}")
    return 0
