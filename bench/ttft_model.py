"""A calibrated TTFT model: predicted time to first token of every prefill method on this machine.

FLOPs alone do not predict TTFT on MLX's CPU backend (BENCHMARKS.md): the softmax's exp runs scalar
(15-17 ns per attention score), the SwiGLU's exp too, and every forward call reads all the weights
of the layers it runs (a one-token base step does little else). The model sums five costs:

    TTFT = matmul FLOPs / FLOP/s                             (compute)
         + weight bytes read by every forward call / bytes/s (each chunk and each step reads its layers)
         + attention scores x cost per score                 (mask, softmax exp, unfused on the CPU)
         + SwiGLU elements x cost per element                (silu(gate) * up: one exp each)
         + layer calls x fixed overhead per layer call       (graph building, dispatch)

The calibration (:func:`calibrate_for`, well under a minute) measures the costs of scores and SwiGLU
elements with micro-benchmarks and fits FLOP/s, bytes/s and the overhead per layer call to timed
chunks and one-token steps through four of each model's own layers (random weights), so the rates
hold at the shapes the models run.
FLOPs and attention scores are the methods' declared costs (``PrefillMethod.cost``); the other
counts (SwiGLU elements, weight bytes read, layer calls) come from the same model shapes and the
method's structure (:func:`workload`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.errors import KVPError
from kvp_mlx.flops import model_shape, step_flops
from kvp_mlx.methods import Pass

_FFN_OUT = ("down_proj", "proj_2", "w2", "fc2")  # the FFN's output projection: its input is the SwiGLU width


@dataclass(frozen=True)
class Calibration:
    """What this machine's CPU (or GPU) does per unit of work."""

    flops_per_s: float  # matmul FLOP/s at the model's shapes
    score_s: float  # seconds per attention score beyond its matmul FLOPs (mask, softmax)
    swiglu_s: float  # seconds per SwiGLU element (silu(gate) * up)
    bytes_per_s: float  # weight bytes per second read by a forward call
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
    bytes_read: int = 0  # weight bytes read: every forward call reads the weights of the layers it runs
    scores: int = 0  # attention scores (the declared cost)
    swiglu: int = 0  # SwiGLU elements
    layer_calls: int = 0  # forward calls x layers

    def __add__(self, other: "Work") -> "Work":
        return Work(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


def predict_seconds(cal: Calibration, work: Work) -> float:
    return (work.flops / cal.flops_per_s + work.bytes_read / cal.bytes_per_s + work.scores * cal.score_s
            + work.swiglu * cal.swiglu_s + work.layer_calls * cal.layer_call_s)


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


def _nbytes(module: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))  # type: ignore[str-unpack, union-attr]


def layer_bytes(model: nn.Module) -> list[int]:
    """Per layer, the bytes of its parameters (what a forward call through it reads)."""
    return [_nbytes(layer) for layer in model.layers]


def head_bytes(model: nn.Module) -> int:
    """Bytes of the output layer (the tied embedding table where there is no separate head)."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        return _nbytes(head)
    emb = next(m for _, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)))
    return _nbytes(emb)


def weight_bytes(model: nn.Module) -> int:
    """Bytes a one-token forward reads: every layer's parameters and the output layer (not the embedding
    table, of which one row is read, unless it is tied and serves as the output layer)."""
    return sum(layer_bytes(model)) + head_bytes(model)


def _fill(model: nn.Module, tokens: int, chunk: int, batch: int) -> Work:
    """A cache-only fill of ``tokens`` in chunks: the last layer computes K/V only (no FFN); each
    chunk reads every layer's weights."""
    widths = swiglu_widths(model)
    calls = math.ceil(tokens / chunk) if tokens > 0 else 0
    return Work(bytes_read=calls * sum(layer_bytes(model)), swiglu=batch * tokens * sum(widths[:-1]),
                layer_calls=calls * len(widths))


def _step(model: nn.Module, offset: int, batch: int) -> Work:
    """One token after ``offset`` cached ones through every layer and the LM head."""
    widths = swiglu_widths(model)
    return Work(flops=step_flops(model_shape(model), offset, batch), bytes_read=weight_bytes(model),
                swiglu=batch * sum(widths), layer_calls=len(widths))


def _pruned(model: nn.Module, tokens_per_layer: list[int], chunk: int) -> Work:
    widths = swiglu_widths(model)
    last = len(widths) - 1
    sw = sum(w * (1 if i == last else n) for i, (w, n) in enumerate(zip(widths, tokens_per_layer)))
    calls = [max(1, math.ceil(n / chunk)) for n in tokens_per_layer]
    return Work(bytes_read=sum(c * b for c, b in zip(calls, layer_bytes(model))) + head_bytes(model),
                swiglu=sw, layer_calls=sum(calls))


# The benchmark's own cases beside the registered methods, as model passes (see Pass).
LAB_CASES: dict[str, Callable[[int], tuple[Pass, ...]]] = {
    # generate_step queues the second token's decode step before the first is materialised; on the
    # CPU the first token waits for it (see the benchmark's case notes)
    "mlx-lm": lambda T: (Pass("base", "fill", T - 1), Pass("base", "step", offset=T - 1),
                         Pass("base", "step", offset=T)),
    "aux-prefill": lambda T: (Pass("aux", "fill", T - 1),),
    "base-step": lambda T: (Pass("base", "step", offset=T - 1),),
}


def passes_work(model: Any, passes: Sequence[Pass], chunk: int, batch: int) -> Work:
    """Counts beyond FLOPs and scores of a sequence of model passes."""
    work = Work()
    for p in passes:
        lm = model.base if p.model == "base" else model.aux
        if p.kind == "fill":
            work = work + _fill(lm, p.tokens, chunk, batch)
        elif p.kind == "step":
            work = work + _step(lm, p.offset, batch)
        elif p.kind == "pruned":
            work = work + _pruned(lm, list(p.tokens_per_layer), chunk)
        else:
            raise KVPError(f"the TTFT model does not know a '{p.kind}' pass")
    return work


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
    """All counts of one TTFT: the declared cost (or ``flops``/``scores`` given) and its passes."""
    from kvp_mlx.methods import available_methods, get_method

    info = info or {}
    if method in LAB_CASES:
        passes = LAB_CASES[method](tokens)
        if flops is None or scores is None:
            flops, scores = _lab_case_cost(method, model, tokens, chunk, batch)
    elif method in available_methods():
        spec = get_method(method)
        cost = spec.cost(model, tokens, chunk, batch, info) if spec.cost is not None else None
        if cost is None:
            raise KVPError(f"method '{method}' has no cost model for this configuration (run it first?)")
        if flops is None or scores is None:
            flops, scores = cost.flops, cost.attention_scores
        passes = cost.passes
    else:
        raise KVPError(f"no cost model for '{method}'")
    if not passes:
        raise KVPError(f"the TTFT model does not know the structure of method '{method}' (no passes declared)")
    extra = passes_work(model, passes, chunk, batch)
    if method == "mlx-lm":  # the extra step's FLOPs come on top of base's declared cost
        flops += _step(model.base, tokens, batch).flops
    return Work(flops=flops, bytes_read=extra.bytes_read, scores=scores, swiglu=extra.swiglu,
                layer_calls=extra.layer_calls)


def _lab_case_cost(case: str, model: Any, tokens: int, chunk: int, batch: int) -> tuple[int, int]:
    """FLOPs and attention scores of a benchmark case that is not a registered method."""
    from kvp_mlx.flops import cache_fill_flops, cache_fill_scores
    from kvp_mlx.methods import get_method

    if case == "mlx-lm":  # base's declared cost (workload adds the extra decode step's FLOPs)
        base_cost = get_method("base").cost
        assert base_cost is not None
        cost = base_cost(model, tokens, chunk, batch, {})
        assert cost is not None
        return cost.flops, cost.attention_scores
    if case == "aux-prefill":
        shape = model_shape(model.aux)
        return cache_fill_flops(shape, tokens - 1, chunk, batch), cache_fill_scores(shape, tokens - 1, chunk, batch)
    shape = model_shape(model.base)  # base-step
    return step_flops(shape, tokens - 1, batch), batch * shape.chunk_scores(1, tokens - 1, False)


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


def micro_costs(
    dim: int = 2048,
    ffn: int = 5632,
    heads: int = 16,
    head_dim: int = 64,
    chunk: int = 256,
    keys: int = 1024,
    dtype: mx.Dtype = mx.float32,
    repeats: int = 5,
) -> dict[str, float]:
    """Micro-benchmarks of the costs that are not matmuls (defaults: OpenELM-1.1B-like shapes):

    - cost per attention score: MLX's ``scaled_dot_product_attention`` with a causal mask over
      ``heads x chunk x keys`` scores, less its matmul FLOPs at the rate of ``[chunk, dim] @ [dim, ffn]``;
    - cost per SwiGLU element: ``silu(a) * b`` on ``[chunk, ffn]``;
    - overhead per layer call: a one-token forward of a tiny 4-layer model, per layer.
    """
    from mlx_lm.models.base import create_causal_mask, scaled_dot_product_attention

    mx.random.seed(0)
    x = mx.random.normal((chunk, dim)).astype(dtype)
    w = mx.random.normal((ffn, dim)).astype(dtype)
    mx.eval(x, w)
    matmul_flops_per_s = 2 * chunk * dim * ffn / _best_time(lambda: mx.eval(x @ w.T), repeats)

    q = mx.random.normal((1, heads, chunk, head_dim)).astype(dtype)
    k = mx.random.normal((1, heads, keys, head_dim)).astype(dtype)
    v = mx.random.normal((1, heads, keys, head_dim)).astype(dtype)
    mx.eval(q, k, v)
    mask = create_causal_mask(chunk, keys - chunk)
    t_att = _best_time(
        lambda: mx.eval(scaled_dot_product_attention(q, k, v, cache=None, scale=head_dim**-0.5, mask=mask)), repeats
    )
    n_scores = heads * chunk * keys
    score_s = max(t_att - 4 * heads * head_dim * chunk * keys / matmul_flops_per_s, 0.0) / n_scores

    a = mx.random.normal((chunk, ffn)).astype(dtype)
    b = mx.random.normal((chunk, ffn)).astype(dtype)
    mx.eval(a, b)
    swiglu_s = _best_time(lambda: mx.eval(nn.silu(a) * b), repeats) / (chunk * ffn)

    from kvp_mlx.building import build_model
    from kvp_mlx.testing import tiny_config

    tiny = build_model(tiny_config("openelm", n_layers=4), seed=0)
    tok = mx.array([[1]])
    layer_call_s = _best_time(lambda: mx.eval(tiny(tok)), max(repeats, 20)) / len(tiny.layers)
    return {"score_s": score_s, "swiglu_s": swiglu_s, "layer_call_s": layer_call_s,
            "matmul_flops_per_s": matmul_flops_per_s}


def layer_runs(model: nn.Module, chunk: int, repeats: int = 3, n_layers: int = 4,
               step_repeats: int = 10) -> list[tuple[Work, float]]:
    """Timed forwards through ``n_layers`` (at most) of ``model``'s own layers (evenly spaced; random weights
    where the model has none yet), with an mlx-lm cache, and their counts: a prefill chunk of
    ``chunk`` tokens, one of ``chunk // 2`` after ``chunk`` cached, and a one-token step after ``chunk``."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.cache import KVCache

    shape = model_shape(model)
    n = len(model.layers)
    picked = sorted({min(n - 1, (2 * i + 1) * n // (2 * n_layers)) for i in range(n_layers)})
    layers = [model.layers[i] for i in picked]
    shapes = [shape.layers[i] for i in picked]
    all_widths, all_bytes = swiglu_widths(model), layer_bytes(model)
    widths = [all_widths[i] for i in picked]
    nbytes = [all_bytes[i] for i in picked]
    dtype = next(v.dtype for _, v in tree_flatten(layers[0].parameters()))  # type: ignore[str-unpack, union-attr]
    mx.eval([layer.parameters() for layer in layers])
    dim = _hidden(model)
    runs = []
    for tokens, offset in ((chunk, 0), (max(1, chunk // 2), chunk), (1, chunk)):
        caches = [KVCache() for _ in layers]
        if offset:
            h0 = (0.1 * mx.random.normal((1, offset, dim))).astype(dtype)
            mask0 = create_attention_mask(h0, caches[0])
            for layer, c in zip(layers, caches):
                h0 = layer(h0, mask0, c)
            mx.eval(h0, [c.state for c in caches])
        x = (0.1 * mx.random.normal((1, tokens, dim))).astype(dtype)
        mx.eval(x)

        def run(x=x, caches=caches, tokens=tokens) -> None:
            h = x
            mask = create_attention_mask(h, caches[0])
            for layer, c in zip(layers, caches):
                h = layer(h, mask, c)
            mx.eval(h)
            for c in caches:
                c.trim(tokens)

        seconds = _best_time(run, step_repeats if tokens == 1 else repeats)  # a step is quick: more tries
        keys = offset + tokens
        work = Work(flops=sum((ls.kv_proj + ls.other_proj) * tokens + ls.attention(tokens, keys) for ls in shapes),
                    bytes_read=sum(nbytes), scores=sum(ls.scores(tokens, keys) for ls in shapes),
                    swiglu=tokens * sum(widths), layer_calls=len(layers))
        runs.append((work, seconds))
    return runs


def fit_rates(runs: list[tuple[Work, float]], score_s: float, swiglu_s: float, layer_call_s: float,
              fallback_flops_per_s: float) -> tuple[float, float, float]:
    """FLOP/s, bytes/s and the overhead per layer call that best predict ``runs`` (least relative
    squares, all positive) once the micro-benchmarked costs of scores and SwiGLU are taken out.
    Where the runs cannot separate them (a noisy machine), the micro-benchmarked overhead and then
    FLOP/s are kept and the rest is fitted."""
    import numpy as np

    t = np.array([t for _, t in runs])
    A = np.array([[w.flops, w.bytes_read, w.layer_calls] for w, _ in runs], float) / t[:, None]
    y = np.array([t - w.scores * score_s - w.swiglu * swiglu_s for w, t in runs]) / t
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    if (coef > 0).all():
        return 1.0 / coef[0], 1.0 / coef[1], float(coef[2])
    y2 = y - A[:, 2] * layer_call_s
    coef, *_ = np.linalg.lstsq(A[:, :2], y2, rcond=None)
    if (coef > 0).all():
        return 1.0 / coef[0], 1.0 / coef[1], layer_call_s
    resid = y2 - A[:, 0] / fallback_flops_per_s
    inv_b = max(float(np.dot(A[:, 1], resid) / np.dot(A[:, 1], A[:, 1])), 1e-15)
    return fallback_flops_per_s, 1.0 / inv_b, layer_call_s


def calibrate_for(
    model: nn.Module | Any, chunk: int = 256, keys: int | None = None, dtype: mx.Dtype = mx.float32,
    repeats: int = 5, also: tuple = (), budget_s: float = 60.0,
) -> Calibration:
    """Calibrate at ``model``'s shapes (and those of the models in ``also``, e.g. an auxiliary):
    micro-benchmarks for attention scores and SwiGLU elements (:func:`micro_costs`), then FLOP/s,
    bytes/s and the overhead per layer call fitted to timed chunks and steps through four layers of
    each model (:func:`layer_runs`)."""
    from kvp_mlx.adapters import attention_modules, kv_shapes
    from kvp_mlx.runtime_env import dtype_name

    tic0 = time.perf_counter()
    widths = [w for w in swiglu_widths(model) if w] or [4 * _hidden(model)]
    attn = attention_modules(model)[0]
    micro = micro_costs(dim=_hidden(model), ffn=max(widths), heads=int(attn.n_heads),
                        head_dim=kv_shapes(model)[0].head_dim, chunk=chunk, keys=keys or 4 * chunk, dtype=dtype,
                        repeats=repeats)
    runs = []
    for m in (model, *also):
        runs += layer_runs(m, chunk, repeats=max(2, repeats // 2))
    flops_per_s, bytes_per_s, layer_call_s = fit_rates(runs, micro["score_s"], micro["swiglu_s"],
                                                       micro["layer_call_s"], micro["matmul_flops_per_s"])
    seconds = time.perf_counter() - tic0
    if seconds > budget_s:
        print(f"note: calibration took {seconds:.0f} s (budget {budget_s:.0f} s): the machine is loaded")
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return Calibration(flops_per_s, micro["score_s"], micro["swiglu_s"], bytes_per_s, layer_call_s,
                       seconds, device, dtype_name(dtype))


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
    from kvp_mlx.mlx_lm_private import model_classes

    model_class, args_class = model_classes(config)
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
    from bench.models import PAIRS, openelm_config
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
    """Predicted beside measured TTFT for every timed case of a ``bench.ttft`` JSON result.

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
    cost non-negative): a check of the model's form, not a calibration of a machine (it sees the answers)."""
    import numpy as np

    A = np.array([[w.flops, w.scores, w.swiglu, w.bytes_read, w.layer_calls] for w in works], float)
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
    """Shapes of a bench result's random-weight OpenELM pairs (``python -m bench.ttft --pairs``)."""
    from bench.models import PAIRS

    models: dict = {}
    for pair in result["settings"].get("pairs", []):
        base_name, aux_name = PAIRS[pair]
        shapes = pair_shapes(pair)
        group = models.setdefault(base_name, {None: ShapePair(shapes.base)})
        group[aux_name] = shapes
    return models


def main(argv: list[str] | None = None) -> int:
    """python -m bench.ttft_model --validate RESULT.json ...: calibrate now, predict every case."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--validate", nargs="+", required=True, help="bench.ttft JSON results (pairs only)")
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
        first = pair_shapes(results[0]["settings"]["pairs"][0])
        cal = calibrate_for(first.base, chunk=results[0]["settings"]["prefill_step_size"], also=(first.aux,))
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
