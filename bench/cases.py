"""One benchmark configuration (a base model, a prompt length, a batch size): build a timed case
for every method, the plain mlx-lm anchor and KV Prediction's parts, run them interleaved, and
derive speedups, FLOPs ratios and the checks.

TTFT of a case: prompt token ids ready (an evaluated ``[B, T]`` array) -> first token sampled
(greedy) and materialised with ``mx.eval``. Tokenization and loading are outside the clock.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import mlx.core as mx
import numpy as np

from bench.models import BenchGroup
from bench.timing import Case, run_interleaved
from kvp_mlx.flops import cache_fill_flops, cache_fill_scores, model_shape, step_flops
from kvp_mlx.methods import Cost, PrefillMethod, available_methods, get_method, run_prefill
from kvp_mlx.methods.base import fill_cache
from kvp_mlx.methods.kvp import predict_base_cache

ANCHOR = "mlx-lm"  # plain mlx-lm prefill of the base model (generate_step)
# Thresholds of the checks (see the acceptance criteria in the report).
BASE_VS_ANCHOR = 0.05  # base within 5% of plain mlx-lm
KVP_VS_PARTS = 0.15  # kvp within 15% of aux prefill (T-1) + one base step
MIN_REALISED = 0.85  # measured speedup >= 85% of the FLOPs-predicted one


def method_listing() -> str:
    """The methods ``--methods`` accepts, each with its declared options (used with their defaults)."""
    from kvp_mlx.methods import method_specs

    def one(spec: PrefillMethod) -> str:
        opts = [f"{o.name}={o.default}" for o in spec.options if o.cli]
        return spec.name + (f" ({', '.join(opts)})" if opts else "")

    return ", ".join([one(s) for s in method_specs()] + [ANCHOR])


def all_method_names() -> list[str]:
    """Everything `--methods` accepts: the registered methods and the mlx-lm anchor."""
    return [*available_methods(), ANCHOR]


def prompt_batch(vocab_size: int, prompt_tokens: int, batch: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(0, vocab_size, size=(batch, prompt_tokens)), dtype=mx.int32)
    mx.eval(tokens)
    return tokens


def _greedy(logits: mx.array) -> mx.array:
    # what decoding samples at temperature 0 (log-probabilities, then argmax), as mlx-lm does
    return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)


def _time_method(model, tokens: mx.array, method: str, chunk: int, info: dict) -> Callable[[], float]:
    def measure() -> float:
        tic = time.perf_counter()
        result = run_prefill(model, tokens, method, prefill_step_size=chunk)
        assert result.logits is not None  # one process: the logits are here
        mx.eval(_greedy(result.logits))
        seconds = time.perf_counter() - tic
        info.update(result.info)
        return seconds

    return measure


def _time_mlx_lm(base, tokens: mx.array, chunk: int) -> Callable[[], float]:
    from mlx_lm.generate import generate_step, generation_stream

    def measure() -> float:
        # the span mlx_lm.stream_generate reports as prompt time (prompt_tps = T / that)
        tic = time.perf_counter()
        steps = generate_step(tokens[0], base, max_tokens=1, prefill_step_size=chunk)
        next(steps)
        seconds = time.perf_counter() - tic
        steps.close()
        mx.synchronize(generation_stream)  # generate_step has already queued the next decode step
        return seconds

    return measure


def _time_fill(lm, tokens: mx.array, chunk: int) -> Callable[[], float]:
    def measure() -> float:
        tic = time.perf_counter()
        fill_cache(lm, tokens, chunk)
        return time.perf_counter() - tic

    return measure


def _time_base_step(model, tokens: mx.array, chunk: int) -> Callable[[], float]:
    """One base decode step on the last prompt token over a cache of the T-1 others."""
    cache = predict_base_cache(model, tokens[:, :-1], chunk)

    def measure() -> float:
        tic = time.perf_counter()
        logits = model.base(tokens[:, -1:], cache=cache)[:, -1, :]
        mx.eval(_greedy(logits))
        seconds = time.perf_counter() - tic
        for c in cache:
            c.trim(1)
        return seconds

    return measure


def build_cases(
    group: BenchGroup, tokens: mx.array, chunk: int, methods: list[str]
) -> tuple[list[Case], list[dict], dict[str, dict]]:
    """Cases for ``methods`` on ``group``; also the methods skipped up front, and per-case info.

    Everything about a method comes from its declaration (kvp_mlx.methods): whether it runs in
    one process, takes a batch, needs an auxiliary (then it runs once per auxiliary model), and
    its cost model (FLOPs and attention scores, counted after the run for pruning methods).
    """
    T, B = tokens.shape[1], tokens.shape[0]
    cases: list[Case] = []
    skipped: list[dict] = []
    infos: dict[str, dict] = {}
    add = cases.append
    base_spec = get_method("base")
    assert base_spec.cost is not None
    base_cost = base_spec.cost(group.base_only, T, chunk, B, {})
    assert base_cost is not None
    if ANCHOR in methods:
        if B == 1:
            add(Case(ANCHOR, _time_mlx_lm(group.base, tokens, chunk), kind="anchor", method=ANCHOR,
                     flops=base_cost.flops, scores=base_cost.attention_scores))
        else:
            skipped.append({"label": ANCHOR, "reason": "mlx-lm's stream_generate takes one prompt (batch 1 only)"})
    for name in methods:
        if name == ANCHOR:
            continue
        spec = get_method(name)
        caps = spec.capabilities
        if caps.needs_launch:
            skipped.append({"label": name, "reason": caps.needs_launch})
            continue
        if B > 1 and not caps.batch:
            skipped.append({"label": name, "reason": "takes one prompt at a time (batch 1 only)"})
            continue
        if caps.needs_aux and not group.variants:
            skipped.append({"label": name, "reason": f"{group.name} has no auxiliary model"})
            continue
        hosts = group.variants.items() if caps.needs_aux else [(None, group.base_only)]
        for aux_name, model in hosts:
            label = f"{name}[{aux_name}]" if aux_name else name
            infos[label] = {}
            add(Case(label, _time_method(model, tokens, name, chunk, infos[label]), method=name, aux=aux_name,
                     cost=_cost_fn(spec, model, T, chunk, B)))
    if "kvp" in methods and group.variants and T > 1:
        # KV Prediction's parts, to compare its TTFT with their sum: the auxiliary's cache fill of
        # T-1 tokens (per auxiliary) and one base step.
        base_shape = model_shape(group.base)
        for aux_name, model in group.variants.items():
            assert model.aux is not None
            aux_shape = model_shape(model.aux)
            add(Case(f"aux-prefill[{aux_name}]", _time_fill(model.aux, tokens[:, :-1], chunk),
                     kind="component", method="aux-prefill", aux=aux_name,
                     flops=cache_fill_flops(aux_shape, T - 1, chunk, B),
                     scores=cache_fill_scores(aux_shape, T - 1, chunk, B)))
        first = next(iter(group.variants.values()))
        add(Case("base-step", _time_base_step(first, tokens, chunk), kind="component", method="base-step",
                 flops=step_flops(base_shape, T - 1, B), scores=B * base_shape.chunk_scores(1, T - 1, False)))
    return cases, skipped, infos


def _cost_fn(spec: PrefillMethod, model, T: int, chunk: int, B: int) -> Callable[[dict], Cost | None]:
    """The method's declared cost for this configuration, given the info of a run."""
    return lambda info: spec.cost(model, T, chunk, B, info) if spec.cost is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def paired_ratio(records: list[dict], num: list[str], den: list[str]) -> float | None:
    """Median over repetitions of sum(num) / sum(den), each repetition's samples taken together.

    Cases of one repetition run back to back, so their ratio cancels most of the drift a shared
    machine's load adds to the samples; the ratio of medians is reported beside it.
    """
    samples = {r["label"]: r["samples_s"] for r in records}
    rows = [samples.get(label) or [] for label in num + den]
    if any(not row for row in rows) or len({len(row) for row in rows}) != 1:
        return None
    n = len(num)
    return statistics.median(
        sum(row[i] for row in rows[:n]) / sum(row[i] for row in rows[n:]) for i in range(len(rows[0]))
    )


def checks(records: list[dict]) -> list[dict]:
    """The acceptance checks one configuration's case records can evaluate.

    ``value`` (what passes or fails) is the paired ratio (:func:`paired_ratio`); ``ratio_of_medians``
    is given beside it.
    """
    med = {r["label"]: r["median_s"] for r in records}
    flops = {r["label"]: r["flops"] for r in records}
    out = []

    def add(name: str, num: list[str], den: list[str], passed, scale: float = 1.0) -> None:
        if any(not med.get(label) for label in num + den):
            return
        paired = paired_ratio(records, num, den)
        value = paired * scale if paired is not None else None
        of_medians = sum(med[label] for label in num) / sum(med[label] for label in den) * scale
        out.append({"check": name, "value": value, "ratio_of_medians": of_medians,
                    "passed": value is not None and passed(value)})

    add("base TTFT within 5% of plain mlx-lm", ["base"], [ANCHOR], lambda v: abs(v - 1) <= BASE_VS_ANCHOR)
    for r in records:
        if r["method"] != "kvp":
            continue
        add(f"{r['label']} TTFT within 15% of aux prefill (T-1) + one base step", [r["label"]],
            [f"aux-prefill[{r['aux']}]", "base-step"], lambda v: abs(v - 1) <= KVP_VS_PARTS)
        if r["flops"] and flops.get("base"):
            # measured speedup (base / kvp) over the FLOPs-predicted one (base FLOPs / kvp FLOPs)
            add(f"{r['label']} measured speedup >= 85% of FLOPs-predicted", ["base"], [r["label"]],
                lambda v: v >= MIN_REALISED, scale=r["flops"] / flops["base"])
    return out


def case_record(case: Case, base: Case | None, info: dict | None) -> dict:
    flops = case.flops if case.flops is not None else (info or {}).get("flops")
    rec = {
        "label": case.label, "kind": case.kind, "method": case.method, "aux": case.aux,
        "samples_s": case.samples, **case.summary(), "flops": flops, "attention_scores": case.scores,
        "speedup_measured": None, "speedup_flops": None, "realised": None,
    }
    if case.skipped:
        rec["skipped"] = case.skipped
    if base is not None and case.kind != "component":
        rec["speedup_measured"] = _ratio(base.median, case.median)
        rec["speedup_flops"] = _ratio(base.flops, flops)
        if rec["speedup_measured"] and rec["speedup_flops"]:
            rec["realised"] = rec["speedup_measured"] / rec["speedup_flops"]
    if info:
        rec["info"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool, list))}
    return rec


def benchmark_config(
    group: BenchGroup,
    prompt_tokens: int,
    batch: int,
    chunk: int,
    methods: list[str],
    warmup: int,
    repetitions: int,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Time every case of one configuration, interleaved; return its JSON record."""
    tokens = prompt_batch(group.vocab_size, prompt_tokens, batch, seed)
    cases, skipped, infos = build_cases(group, tokens, chunk, methods)
    run_interleaved(cases, warmup, repetitions, log)
    for c in cases:  # declared costs, with what each run reported (token pruning counts kept tokens)
        if c.cost is not None:
            cost = c.cost(infos.get(c.label, {}))
            if cost is not None:
                c.flops, c.scores = cost.flops, cost.attention_scores
    timed = [c for c in cases if not c.skipped]
    skipped += [{"label": c.label, "reason": c.skipped} for c in cases if c.skipped]
    base = next((c for c in timed if c.label == "base"), None)
    records = [case_record(c, base, infos.get(c.label)) for c in timed]
    return {
        "model": group.name,
        "source": group.source,
        "prompt_tokens": prompt_tokens,
        "batch": batch,
        "prefill_step_size": chunk,
        "cases": records,
        "skipped": skipped,
        "checks": checks(records),
    }
