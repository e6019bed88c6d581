"""The calibrated TTFT model (bench/ttft_model.py) and the Pareto front (bench/pareto.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

from kvp_mlx import testing as mb
from bench import ttft_model as tm
from bench.pareto import pareto_front
from kvp_mlx.flops import model_shape
from kvp_mlx.methods import get_method

RESULTS = Path(__file__).parent.parent / "bench" / "results" / "2026-11-23-vm"
CAL = tm.Calibration(flops_per_s=1e11, score_s=15e-9, swiglu_s=2e-9, bytes_per_s=1e10, layer_call_s=1e-4)


@pytest.fixture(scope="module")
def llama():
    cfg = mb.tiny_config("llama", n_layers=3, vocab_size=256)
    return cfg, mb.build_model(cfg, seed=0)


def test_counts_follow_the_model(llama):
    cfg, model = llama
    assert tm.swiglu_widths(model) == [cfg["intermediate_size"]] * 3
    params = dict(tree_flatten(model.parameters()))
    head = (
        sum(v.nbytes for k, v in params.items() if k.startswith("lm_head"))
        or params["model.embed_tokens.weight"].nbytes
    )
    layers = sum(v.nbytes for k, v in params.items() if k.startswith("model.layers."))
    assert tm.weight_bytes(model) == layers + head


def test_workload_uses_declared_costs(llama):
    _, model = llama
    pair = tm.ShapePair(model)
    T, chunk = 40, 16
    work = tm.workload("base", pair, T, chunk, 1)
    cost = get_method("base").cost(pair, T, chunk, 1, {})
    assert (work.flops, work.scores) == (cost.flops, cost.attention_scores)
    width = tm.swiglu_widths(model)[0]
    # cache fill of T-1 (the last layer computes K/V only) + one full step
    assert work.swiglu == (T - 1) * 2 * width + 3 * width
    assert work.layer_calls == (math.ceil((T - 1) / chunk) + 1) * 3
    # every chunk reads the layers; the step reads them and the head
    assert work.bytes_read == math.ceil((T - 1) / chunk) * sum(tm.layer_bytes(model)) + tm.weight_bytes(model)


def test_prediction_is_linear_in_the_costs(llama):
    _, model = llama
    work = tm.workload("base", tm.ShapePair(model), 64, 16, 1)
    slow = tm.Calibration(
        CAL.flops_per_s / 2, CAL.score_s * 2, CAL.swiglu_s * 2, CAL.bytes_per_s / 2, CAL.layer_call_s * 2
    )
    assert tm.predict_seconds(slow, work) == pytest.approx(2 * tm.predict_seconds(CAL, work))


def test_shapes_only_pair_matches_the_benchmark_counts():
    """--predict builds no weights, yet counts what the benchmark counted on the real models."""
    result = json.loads((RESULTS / "quick.json").read_text())
    run = result["runs"][0]
    flops = {c["label"]: c["flops"] for c in run["cases"]}
    rows = tm.predict_table(CAL, ["kvp-c-270m"], [run["prompt_tokens"]], run["prefill_step_size"])
    by = {r["method"]: r for r in rows}
    assert by["base"]["flops"] == flops["base"]
    assert by["kvp"]["flops"] == flops["kvp[OpenELM-270M]"]
    assert by["aux"]["flops"] == flops["aux[OpenELM-270M]"]
    assert by["kvp"]["predicted_s"] < by["base"]["predicted_s"]


def test_predicts_every_case_of_a_committed_run():
    pair = tm.pair_shapes("kvp-c-270m")
    models = {"OpenELM-1_1B": {None: tm.ShapePair(pair.base), "OpenELM-270M": pair}}
    result = json.loads((RESULTS / "quick.json").read_text())
    rows = tm.predict_bench_result(CAL, result, models)
    timed = [c for run in result["runs"] for c in run["cases"] if c["median_s"] is not None]
    assert len(rows) == len(timed)
    pred = {(r["prompt_tokens"], r["label"]): r["predicted_s"] for r in rows}
    assert pred[(128, "mlx-lm")] > pred[(128, "base")] > pred[(128, "lazy")]
    assert all(p > 0 for p in pred.values())
    assert "median |error|" in tm.comparison_markdown(rows)


def test_calibration_on_a_tiny_model(llama):
    _, model = llama
    cal = tm.calibrate_for(model, chunk=16, repeats=2)
    for value in (cal.flops_per_s, cal.bytes_per_s, cal.swiglu_s, cal.layer_call_s):
        assert value > 0 and math.isfinite(value)
    assert cal.score_s >= 0
    assert tm.Calibration.from_dict(cal.to_dict()) == cal


def test_pareto_front():
    pts = [
        {"label": "a", "t": 1.0, "accuracy": 0.5},
        {"label": "b", "t": 2.0, "accuracy": 0.6},
        {"label": "c", "t": 3.0, "accuracy": 0.55},
        {"label": "d", "t": 1.5, "accuracy": 0.5},
    ]
    assert pareto_front(pts, "t") == ["a", "b"]


def test_fit_rates_recovers_a_known_machine(llama):
    """Times made by a known calibration from the counts of real layer runs give back its rates."""
    _, model = llama
    runs = tm.layer_runs(model, chunk=16, repeats=1, n_layers=2)
    assert [w.layer_calls for w, _ in runs] == [2, 2, 2]
    assert runs[0][0].bytes_read == tm.layer_bytes(model)[0] + tm.layer_bytes(model)[2]
    other = tm.layer_runs(tm.pair_shapes("kvp-c-270m").aux, chunk=16, repeats=1)  # other shapes, other bytes
    known = tm.Calibration(flops_per_s=8e10, score_s=15e-9, swiglu_s=2e-9, bytes_per_s=9e9, layer_call_s=3e-4)
    synthetic = [(w, tm.predict_seconds(known, w)) for w, _ in runs + other]
    f, b, o = tm.fit_rates(synthetic, known.score_s, known.swiglu_s, 1e-3, 1e11)
    assert f == pytest.approx(known.flops_per_s, rel=1e-6)
    assert b == pytest.approx(known.bytes_per_s, rel=1e-6)
    assert o == pytest.approx(known.layer_call_s, rel=1e-6)


def test_layer_runs_count_what_they_run(llama):
    _, model = llama
    shape = model_shape(model)
    (fill, _), (half, _), (step, _) = tm.layer_runs(model, chunk=16, repeats=1, n_layers=2)
    layers = [shape.layers[i] for i in (0, 2)]  # two of three layers, evenly spaced
    assert fill.flops == sum((ls.kv_proj + ls.other_proj) * 16 + ls.attention(16, 16) for ls in layers)
    assert half.scores == sum(ls.scores(8, 24) for ls in layers)
    assert step.flops == sum((ls.kv_proj + ls.other_proj) + ls.attention(1, 17) for ls in layers)
    assert fill.swiglu == 16 * 2 * tm.swiglu_widths(model)[0]
