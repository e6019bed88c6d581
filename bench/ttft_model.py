"""A calibrated TTFT model: predicted time to first token of every prefill method on this machine.

FLOPs alone do not predict TTFT on MLX's CPU backend (platform.md): the softmax's exp runs scalar
(15-17 ns per attention score), the SwiGLU's exp too, and a one-token base step is memory-bound
(the weights are read once for almost no FLOPs). The model therefore sums five costs, each
calibrated by a short micro-benchmark on this machine (:func:`calibrate`, well under a minute):

    TTFT = compute FLOPs / matmul FLOP/s                     (chunked prefill: compute-bound)
         + sum over one-token forwards of max(FLOPs / FLOP/s, weight bytes / bytes/s)  (memory-bound)
         + attention scores x cost per score                  (mask, softmax exp, unfused on the CPU)
         + SwiGLU elements x cost per element                 (silu(gate) * up: one exp each)
         + layer calls x fixed overhead per layer call        (graph building, dispatch)

FLOPs and attention scores are the methods' declared costs (``PrefillMethod.cost``); the other
counts (SwiGLU elements, the forwards that are one token, weight bytes, layer calls) come from the
same model shapes and the method's structure (:func:`workload`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.errors import KVPError
from kvp_mlx.flops import model_shape, step_flops

_FFN_OUT = ("down_proj", "proj_2", "w2", "fc2")  # the FFN's output projection: its input is the SwiGLU width


@dataclass(frozen=True)
class Calibration:
    """What this machine's CPU (or GPU) does per unit of work."""

    flops_per_s: float  # matmul FLOP/s at prefill-chunk shapes
    score_s: float  # seconds per attention score beyond its matmul FLOPs (mask, softmax)
    swiglu_s: float  # seconds per SwiGLU element (silu(gate) * up)
    bytes_per_s: float  # weight bytes per second read by a one-token (memory-bound) forward
    layer_call_s: float  # fixed overhead per layer per forward call
    seconds: float = 0.0  # how long the calibration took
    device: str = "cpu"
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Work:
    """Counts of one TTFT computation."""

    flops: int = 0  # all matmul FLOPs (the declared cost)
    step_flops: int = 0  # of which: in one-token forwards (bounded by weight reads instead)
    step_bytes: int = 0  # weight bytes read by the one-token forwards
    scores: int = 0  # attention scores (the declared cost)
    swiglu: int = 0  # SwiGLU elements
    layer_calls: int = 0  # forward calls x layers

    def __add__(self, other: "Work") -> "Work":
        return Work(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


def predict_seconds(cal: Calibration, work: Work) -> float:
    compute = (work.flops - work.step_flops) / cal.flops_per_s
    step = (
        max(work.step_flops / cal.flops_per_s, work.step_bytes / cal.bytes_per_s)
        if work.step_bytes
        else (work.step_flops / cal.flops_per_s)
    )
    return compute + step + work.scores * cal.score_s + work.swiglu * cal.swiglu_s + work.layer_calls * cal.layer_call_s


# ---------------------------------------------------------------------------------------------- counts


def swiglu_widths(model: nn.Module) -> list[int]:
    """Per layer, the width of the FFN's gated activation (0 where none is found)."""
    widths = []
    for layer in model.layers:
        width = 0
        for name, module in layer.named_modules():
            if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and name.rsplit(".", 1)[-1] in _FFN_OUT:
                packed = module.weight.shape[1]
                bits = getattr(module, "bits", None)
                width = packed * 32 // bits if bits else packed
        widths.append(width)
    return widths


def weight_bytes(model: nn.Module) -> int:
    """Bytes a one-token forward reads: every layer's parameters and the output layer (not the embedding
    table, of which one row is read, unless it is tied and serves as the output layer)."""
    from mlx.utils import tree_flatten

    total = 0
    for layer in model.layers:
        total += sum(v.nbytes for _, v in tree_flatten(layer.parameters()))  # type: ignore[str-unpack, union-attr]
    head = getattr(model, "lm_head", None)
    if head is not None:
        total += sum(v.nbytes for _, v in tree_flatten(head.parameters()))  # type: ignore[str-unpack, union-attr]
    else:
        emb = next(m for _, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)))
        total += sum(v.nbytes for _, v in tree_flatten(emb.parameters()))  # type: ignore[str-unpack, union-attr]
    return total


def _fill(model: nn.Module, tokens: int, chunk: int, batch: int) -> Work:
    """A cache-only fill of ``tokens`` in chunks: the last layer computes K/V only (no FFN)."""
    widths = swiglu_widths(model)
    calls = math.ceil(tokens / chunk) if tokens > 0 else 0
    return Work(swiglu=batch * tokens * sum(widths[:-1]), layer_calls=calls * len(widths))


def _step(model: nn.Module, offset: int, batch: int) -> Work:
    """One token after ``offset`` cached ones through every layer and the LM head: memory-bound."""
    widths = swiglu_widths(model)
    flops = step_flops(model_shape(model), offset, batch)
    return Work(step_flops=flops, step_bytes=weight_bytes(model), swiglu=batch * sum(widths), layer_calls=len(widths))


def _pruned(model: nn.Module, tokens_per_layer: list[int], chunk: int) -> Work:
    widths = swiglu_widths(model)
    last = len(widths) - 1
    sw = sum(w * (1 if i == last else n) for i, (w, n) in enumerate(zip(widths, tokens_per_layer)))
    calls = sum(max(1, math.ceil(n / chunk)) for n in tokens_per_layer)
    return Work(swiglu=sw, layer_calls=calls)


def structure(method: str, model: Any, tokens: int, chunk: int, batch: int, info: dict) -> Work | None:
    """Counts beyond FLOPs and scores for a method (or a benchmark component), None if unknown."""
    T = tokens
    if method in ("base", "mlx-lm"):
        work = _fill(model.base, T - 1, chunk, batch) + _step(model.base, T - 1, batch)
        if method == "mlx-lm":
            # generate_step queues the second token's decode step before the first is materialised;
            # on the CPU the first token waits for it (see the benchmark's case notes).
            extra = _step(model.base, T, batch)
            work = work + Work(
                step_flops=extra.step_flops,
                step_bytes=extra.step_bytes,
                swiglu=extra.swiglu,
                layer_calls=extra.layer_calls,
                flops=extra.step_flops,
            )
        return work
    if method == "aux":
        return _fill(model.aux, T - 1, chunk, batch) + _step(model.aux, T - 1, batch)
    if method == "kvp":
        if T == 1:
            return _step(model.base, 0, batch)
        return _fill(model.aux, T - 1, chunk, batch) + _step(model.base, T - 1, batch)
    if method == "aux-prefill":
        return _fill(model.aux, T - 1, chunk, batch)
    if method == "base-step":
        return _step(model.base, T - 1, batch)
    if method in ("lazy", "rp"):
        kept = info.get("tokens_per_layer")
        if not kept:
            return None
        return _pruned(model.base, kept, chunk)
    return None


def workload(
    method: str,
    model: Any,
    tokens: int,
    chunk: int,
    batch: int,
    info: dict | None = None,
    flops: int | None = None,
    scores: int | None = None,
) -> Work:
    """All counts of one TTFT: the declared cost (or ``flops``/``scores`` given) and the structure."""
    from kvp_mlx.flops import cache_fill_flops, cache_fill_scores
    from kvp_mlx.methods import available_methods, get_method

    info = info or {}
    if flops is None or scores is None:
        if method in available_methods():
            spec = get_method(method)
            cost = spec.cost(model, tokens, chunk, batch, info) if spec.cost is not None else None
            if cost is None:
                raise KVPError(f"method '{method}' has no cost model for this configuration (run it first?)")
            flops, scores = cost.flops, cost.attention_scores
        elif method == "mlx-lm":
            base_cost = get_method("base").cost
            assert base_cost is not None
            cost = base_cost(model, tokens, chunk, batch, info)
            assert cost is not None
            flops, scores = cost.flops, cost.attention_scores
        elif method == "aux-prefill":
            shape = model_shape(model.aux)
            flops, scores = (
                cache_fill_flops(shape, tokens - 1, chunk, batch),
                cache_fill_scores(shape, tokens - 1, chunk, batch),
            )
        elif method == "base-step":
            shape = model_shape(model.base)
            flops, scores = step_flops(shape, tokens - 1, batch), batch * shape.chunk_scores(1, tokens - 1, False)
        else:
            raise KVPError(f"no cost model for '{method}'")
    extra = structure(method, model, tokens, chunk, batch, info)
    if extra is None:
        raise KVPError(f"the TTFT model does not know the structure of method '{method}'")
    if method == "mlx-lm":  # the extra step's FLOPs are in the structure, on top of base's
        return Work(
            flops=flops + extra.flops,
            step_flops=extra.step_flops,
            step_bytes=extra.step_bytes,
            scores=scores,
            swiglu=extra.swiglu,
            layer_calls=extra.layer_calls,
        )
    return Work(
        flops=flops,
        step_flops=extra.step_flops,
        step_bytes=extra.step_bytes,
        scores=scores,
        swiglu=extra.swiglu,
        layer_calls=extra.layer_calls,
    )


# ---------------------------------------------------------------------------------------------- calibration


def _best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs after a warm-up: on a shared machine the minimum is the least
    disturbed estimate of what the work itself costs."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def calibrate(
    dim: int = 2048,
    ffn: int = 5632,
    heads: int = 16,
    head_dim: int = 64,
    chunk: int = 256,
    keys: int = 1024,
    dtype: mx.Dtype = mx.float32,
    repeats: int = 5,
    budget_s: float = 50.0,
    weight_bytes_read: int = 512 << 20,
) -> Calibration:
    """Micro-benchmarks at a model's shapes (defaults: OpenELM-1.1B-like, prefill chunks of 256).

    - matmul FLOP/s: ``[chunk, dim] @ [dim, ffn]``;
    - cost per attention score: MLX's ``scaled_dot_product_attention`` with a causal mask over
      ``heads x chunk x keys`` scores, less its matmul FLOPs at the measured rate;
    - cost per SwiGLU element: ``silu(a) * b`` on ``[chunk, ffn]``;
    - bytes/s: one-token matmuls through ``weight_bytes_read`` bytes of weights (512 MB: more than any cache);
    - overhead per layer call: a one-token forward of a tiny 4-layer model, per layer.
    """
    tic0 = time.perf_counter()
    mx.random.seed(0)
    x = mx.random.normal((chunk, dim)).astype(dtype)
    w = mx.random.normal((dim, ffn)).astype(dtype)
    mx.eval(x, w)
    t_mm = _best_time(lambda: mx.eval(x @ w), repeats)
    flops_per_s = 2 * chunk * dim * ffn / t_mm

    from mlx_lm.models.base import scaled_dot_product_attention

    q = mx.random.normal((1, heads, chunk, head_dim)).astype(dtype)
    k = mx.random.normal((1, heads, keys, head_dim)).astype(dtype)
    v = mx.random.normal((1, heads, keys, head_dim)).astype(dtype)
    mx.eval(q, k, v)
    from mlx_lm.models.base import create_causal_mask

    mask = create_causal_mask(chunk, keys - chunk)
    t_att = _best_time(
        lambda: mx.eval(scaled_dot_product_attention(q, k, v, cache=None, scale=head_dim**-0.5, mask=mask)), repeats
    )
    n_scores = heads * chunk * keys
    score_s = max(t_att - 4 * heads * head_dim * chunk * keys / flops_per_s, 0.0) / n_scores

    a = mx.random.normal((chunk, ffn)).astype(dtype)
    b = mx.random.normal((chunk, ffn)).astype(dtype)
    mx.eval(a, b)
    t_sw = _best_time(lambda: mx.eval(nn.silu(a) * b), repeats)
    swiglu_s = t_sw / (chunk * ffn)

    n_mats = max(1, weight_bytes_read // (dim * ffn * dtype.size))
    mats = [mx.random.normal((dim, ffn)).astype(dtype) for _ in range(n_mats)]
    mx.eval(mats)
    x1 = mx.random.normal((1, dim)).astype(dtype)
    mx.eval(x1)
    t_bw = _best_time(lambda: mx.eval([x1 @ m for m in mats]), repeats)
    bytes_per_s = n_mats * dim * ffn * dtype.size / t_bw
    mats.clear()  # free the buffers

    from kvp_mlx.testing import tiny_config
    from kvp_mlx.building import build_model

    tiny = build_model(tiny_config("openelm", n_layers=4), seed=0)
    tok = mx.array([[1]])
    n_layers = len(tiny.layers)
    t_call = _best_time(lambda: mx.eval(tiny(tok)), max(repeats, 20))
    layer_call_s = t_call / n_layers
    seconds = time.perf_counter() - tic0
    if seconds > budget_s:
        print(f"note: calibration took {seconds:.0f} s (budget {budget_s:.0f} s): the machine is loaded")
    from kvp_mlx.runtime_env import dtype_name

    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return Calibration(flops_per_s, score_s, swiglu_s, bytes_per_s, layer_call_s, seconds, device, dtype_name(dtype))


def calibrate_for(
    model: nn.Module, chunk: int = 256, keys: int | None = None, dtype: mx.Dtype = mx.float32, repeats: int = 5
) -> Calibration:
    """:func:`calibrate` at ``model``'s shapes: its hidden and FFN widths, heads, head size; the
    memory-bound test reads as many bytes as the model's weights (at most 512 MB)."""
    from kvp_mlx.adapters import attention_modules, kv_shapes

    widths = [w for w in swiglu_widths(model) if w] or [4 * _hidden(model)]
    attn = attention_modules(model)[0]
    return calibrate(
        dim=_hidden(model),
        ffn=max(widths),
        heads=int(attn.n_heads),
        head_dim=kv_shapes(model)[0].head_dim,
        chunk=chunk,
        keys=keys or 4 * chunk,
        dtype=dtype,
        repeats=repeats,
        weight_bytes_read=min(512 << 20, max(1 << 20, weight_bytes(model))),
    )


def _hidden(model: nn.Module) -> int:
    emb = next(m for _, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)))
    return int(emb.dims) if hasattr(emb, "dims") else int(emb.weight.shape[1])


def calibration_line(cal: Calibration) -> str:
    return (
        f"calibration ({cal.device}, {cal.dtype}, {cal.seconds:.1f} s): matmul {cal.flops_per_s / 1e9:.1f} GFLOP/s, "
        f"{cal.score_s * 1e9:.2f} ns per attention score, {cal.swiglu_s * 1e9:.2f} ns per SwiGLU element, "
        f"{cal.bytes_per_s / 1e9:.2f} GB/s weight reads, {cal.layer_call_s * 1e6:.0f} us per layer call"
    )


# ---------------------------------------------------------------------------------------------- shapes without weights


def shape_model(config: dict) -> nn.Module:
    """An mlx-lm model of ``config`` whose weights are never evaluated (shapes only, no memory)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


@dataclass
class ShapePair:
    """What cost models read: the base, an auxiliary and a predictor (shapes only)."""

    base: nn.Module
    aux: nn.Module | None = None
    predictor: Any = None
    tokenizer: Any = None
    path: Any = None
    dtype: mx.Dtype = mx.float32


def pair_shapes(pair: str, dtype: mx.Dtype = mx.float32) -> ShapePair:
    """The paper's OpenELM pair ``pair`` (bench.models.PAIRS) as shapes (no weights evaluated)."""
    from kvp_mlx.bench.models import PAIRS, openelm_config
    from kvp_mlx.convert.corenet_config import LAYER_PRUNED_CONFIGS
    from kvp_mlx.predictor import KVPredictor, PredictorConfig, default_layer_mapping
    from kvp_mlx.adapters import kv_shapes

    if pair not in PAIRS:
        raise KVPError(f"unknown model pair '{pair}' (known: {', '.join(PAIRS)})")
    base_name, aux_name = PAIRS[pair]
    base = shape_model(openelm_config(base_name))
    keep = getattr(LAYER_PRUNED_CONFIGS.get(aux_name), "select_layers", None)
    if keep is not None:
        import copy

        cfg = copy.deepcopy(openelm_config(base_name))
        cfg["num_transformer_layers"] = len(keep)
        for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            cfg[key] = [openelm_config(base_name)[key][i] for i in keep]
        aux = shape_model(cfg)
    else:
        aux = shape_model(openelm_config(aux_name))
    base_kv, aux_kv = kv_shapes(base), kv_shapes(aux)
    predictor = KVPredictor(PredictorConfig(default_layer_mapping(len(base_kv), len(aux_kv)), base_kv, aux_kv))
    for m in (base, aux, predictor):
        m.set_dtype(dtype)
    return ShapePair(base, aux, predictor, dtype=dtype)


def predict_table(
    cal: Calibration,
    pairs: list[str],
    lengths: list[int],
    chunk: int = 256,
    batch: int = 1,
    dtype: mx.Dtype = mx.float32,
    methods: tuple[str, ...] = ("base", "kvp", "aux"),
) -> list[dict]:
    """Predicted TTFT of ``methods`` for each pair and prompt length (no model is run)."""
    rows = []
    for pair in pairs:
        model = pair_shapes(pair, dtype)
        for T in lengths:
            base_t = None
            for method in methods:
                work = workload(method, model, T, chunk, batch)
                t = predict_seconds(cal, work)
                base_t = t if method == "base" else base_t
                rows.append(
                    {
                        "pair": pair,
                        "prompt_tokens": T,
                        "batch": batch,
                        "method": method,
                        "predicted_s": t,
                        "flops": work.flops,
                        "attention_scores": work.scores,
                        "speedup_predicted": (base_t / t) if base_t else None,
                    }
                )
    return rows


def predict_markdown(cal: Calibration, rows: list[dict]) -> str:
    lines = [
        calibration_line(cal),
        "",
        "| pair | T | B | method | predicted TTFT (s) | GFLOPs | scores (M) | predicted speedup over base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = f"{r['speedup_predicted']:.2f}" if r["speedup_predicted"] else "n/a"
        lines.append(
            f"| {r['pair']} | {r['prompt_tokens']} | {r['batch']} | {r['method']} | {r['predicted_s']:.3f} "
            f"| {r['flops'] / 1e9:.4g} | {r['attention_scores'] / 1e6:.4g} | {sp} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- validation


def predict_bench_result(cal: Calibration, result: dict, models: dict[str, Any]) -> list[dict]:
    """Predicted beside measured TTFT for every timed case of a ``kvp-mlx bench`` JSON result.

    ``models``: run model name (e.g. "OpenELM-1_1B") -> a dict auxiliary name -> model (shapes), with
    key None for the base-only model.
    """
    rows = []
    for run in result["runs"]:
        chunk, T, B = run["prefill_step_size"], run["prompt_tokens"], run["batch"]
        group = models[run["model"]]
        for c in run["cases"]:
            if c.get("median_s") is None:
                continue
            model = group.get(c.get("aux")) or next(iter(group.values()))
            work = workload(
                c["method"],
                model,
                T,
                chunk,
                B,
                c.get("info") or {},
                flops=c.get("flops"),
                scores=c.get("attention_scores"),
            )
            pred = predict_seconds(cal, work)
            rows.append(
                {
                    "model": run["model"],
                    "prompt_tokens": T,
                    "batch": B,
                    "label": c["label"],
                    "measured_s": c["median_s"],
                    "predicted_s": pred,
                    "error": pred / c["median_s"] - 1,
                }
            )
    return rows


def error_summary(rows: list[dict]) -> dict:
    errs = [abs(r["error"]) for r in rows]
    return {
        "cases": len(errs),
        "median_abs_error": statistics.median(errs) if errs else None,
        "max_abs_error": max(errs) if errs else None,
    }


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["| model | T | B | case | measured TTFT (s) | predicted (s) | error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['prompt_tokens']} | {r['batch']} | {r['label']} | {r['measured_s']:.3f} "
            f"| {r['predicted_s']:.3f} | {r['error'] * 100:+.1f}% |"
        )
    s = error_summary(rows)
    if s["cases"]:
        lines += [
            "",
            f"{s['cases']} cases: median |error| {s['median_abs_error'] * 100:.1f}%, "
            f"max |error| {s['max_abs_error'] * 100:.1f}%",
        ]
    return "\n".join(lines)


def load_calibration(path: Path) -> Calibration:
    try:
        return Calibration.from_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise KVPError(f"cannot read calibration {path}: {e}") from None


def fit_calibration(works: list[Work], measured: list[float]) -> Calibration:
    """The calibration that best predicts ``measured`` from ``works`` (least relative squares, every
    cost non-negative): a check of the model's form, not a calibration of a machine (it sees the answers).
    The one-token forwards are taken as memory-bound."""
    import numpy as np

    A = np.array([[w.flops - w.step_flops, w.scores, w.swiglu, w.step_bytes, w.layer_calls] for w in works], float)
    y = np.array(measured, float)
    A = A / y[:, None]
    scale = np.where(A.max(axis=0) > 0, A.max(axis=0), 1.0)
    A = A / scale
    active = list(range(A.shape[1]))
    while True:  # least squares on the active columns; drop the most negative, repeat
        coef = np.zeros(A.shape[1])
        sol, *_ = np.linalg.lstsq(A[:, active], np.ones(len(y)), rcond=None)
        coef[active] = sol
        if (sol >= 0).all():
            break
        active.pop(int(np.argmin(sol)))
    p = coef / scale
    inv = lambda v: 1.0 / v if v > 0 else float("inf")  # noqa: E731
    return Calibration(inv(p[0]), p[1], p[2], inv(p[3]), p[4], 0.0, "fitted", "float32")


def _validation_models(result: dict) -> dict:
    """Shapes of a bench result's random-weight OpenELM pairs (``kvp-mlx bench --pairs``)."""
    from kvp_mlx.bench.models import PAIRS

    models: dict = {}
    for pair in result["settings"].get("pairs", []):
        base_name, aux_name = PAIRS[pair]
        shapes = pair_shapes(pair)
        group = models.setdefault(base_name, {None: ShapePair(shapes.base)})
        group[aux_name] = shapes
    return models


def main(argv: list[str] | None = None) -> int:
    """python -m kvp_mlx.bench.ttft_model --validate RESULT.json ...: calibrate now, predict every case."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--validate", nargs="+", required=True, help="kvp-mlx bench JSON results (pairs only)")
    parser.add_argument("--calibration", help="a saved calibration JSON instead of calibrating now")
    parser.add_argument("--save-calibration", help="write the calibration used here")
    parser.add_argument(
        "--fit", action="store_true", help="also fit the five costs to the measurements (a check of the model's form)"
    )
    args = parser.parse_args(argv)
    results = [json.loads(Path(p).read_text()) for p in args.validate]
    if args.calibration:
        cal = load_calibration(Path(args.calibration))
    else:
        first = results[0]["settings"]["pairs"][0]
        cal = calibrate_for(pair_shapes(first).base, chunk=results[0]["settings"]["prefill_step_size"])
    if args.save_calibration:
        Path(args.save_calibration).write_text(json.dumps(cal.to_dict(), indent=1))
    cals = [("calibrated now" if not args.calibration else f"calibration {args.calibration}", cal)]
    if args.fit:
        works, measured = [], []
        for result in results:
            models = _validation_models(result)
            for run in result["runs"]:
                for c in run["cases"]:
                    if c.get("median_s") is None:
                        continue
                    model = models[run["model"]].get(c.get("aux")) or models[run["model"]][None]
                    works.append(
                        workload(
                            c["method"],
                            model,
                            run["prompt_tokens"],
                            run["prefill_step_size"],
                            run["batch"],
                            c.get("info") or {},
                            flops=c.get("flops"),
                            scores=c.get("attention_scores"),
                        )
                    )
                    measured.append(c["median_s"])
        cals.append(("fitted to these measurements (form check)", fit_calibration(works, measured)))
    for name, c in cals:
        print(f"## {name}\n\n{calibration_line(c)}\n")
        rows = []
        for _path, result in zip(args.validate, results):
            rows += predict_bench_result(c, result, _validation_models(result))
        print(comparison_markdown(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
