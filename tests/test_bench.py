"""The benchmark: FLOPs accounting, OpenELM shapes, interleaving, and the output of a tiny run."""

from __future__ import annotations

import importlib
import json
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from kvp_mlx import testing as mb
from bench.report import write_plots
from bench.cases import checks, paired_ratio
from bench.timing import Case, interleaved_schedule, run_interleaved
from bench.ttft import main as ttft_main
from kvp_mlx.flops import (
    LayerShape, cache_fill_flops, kvp_flops, kvp_scores, model_shape, predictor_flops, prefill_flops,
    prefill_scores, pruned_prefill_flops, pruned_prefill_scores, step_flops,
)
from bench.models import PAIRS, openelm_config
from kvp_mlx.runtime_env import gpu_available

# tiny_config("openelm"): dim 64, head_dim 16, 4 query heads, 2 KV heads, FFN 64 (mult 1.0, divisor 32)
QKV = 2 * 64 * (4 + 2 + 2) * 16  # 16384 per token: the fused qkv projection (it produces K and V)
OTHER = 2 * 64 * 64 + 2 * 64 * 128 + 2 * 64 * 64  # 32768: out_proj, FFN proj_1 (GLU: 2x64), proj_2
HEAD = 2 * 64 * 512  # 65536: tied LM head
ATTN = 4 * 4 * 16  # 256 per (query, key) pair: scores and weighted values over 4 heads of 16


def test_model_shape_reads_per_token_flops():
    shape = model_shape(mb.build_model(mb.tiny_config("openelm", n_layers=2, vocab_size=512)))
    assert shape.layers == (LayerShape(QKV, OTHER, 4, 16),) * 2
    assert shape.lm_head == HEAD


def test_prefill_flops_by_hand():
    shape = model_shape(mb.build_model(mb.tiny_config("openelm", n_layers=2, vocab_size=512)))
    # T=5 in chunks of 2: cache-fill of 4 tokens (chunks [0,2) and [2,4)), then token 5 attends 5 keys.
    # Cache-only chunks: layer 0 runs fully; the last layer runs only its K/V (qkv) projection.
    chunk1 = (2 * QKV + 2 * OTHER + ATTN * 2 * 2) + 2 * QKV  # 2 queries x 2 keys
    chunk2 = (2 * QKV + 2 * OTHER + ATTN * 2 * 4) + 2 * QKV  # 2 queries x 4 keys (masked ones computed)
    step = HEAD + 2 * (QKV + OTHER + ATTN * 5)
    assert (chunk1, chunk2, step) == (132096, 133120, 166400)
    assert cache_fill_flops(shape, 4, chunk=2) == chunk1 + chunk2
    assert step_flops(shape, 4) == step
    assert prefill_flops(shape, 5, chunk=2) == 431616
    assert prefill_flops(shape, 5, chunk=2, batch=3) == 3 * 431616
    # one chunk of 4 computes 4x4 scores instead of 2x2 + 2x4
    assert cache_fill_flops(shape, 4, chunk=4) == chunk1 + chunk2 + ATTN * (16 - 4 - 8)


def test_pruned_prefill_flops_by_hand():
    shape = model_shape(mb.build_model(mb.tiny_config("openelm", n_layers=2, vocab_size=512)))
    # lazy-style: layer 0 computes 5 tokens (chunks of 2: 2x2, 2x4, 1x5 pairs), the last layer 3 tokens'
    # K/V and the rest of the layer for the last token only (1 query x 3 keys), then the LM head
    layer0 = 5 * (QKV + OTHER) + ATTN * (4 + 8 + 5)
    layer1 = 3 * QKV + OTHER + ATTN * 3
    assert pruned_prefill_flops(shape, [5, 3], chunk=2) == layer0 + layer1 + HEAD
    assert pruned_prefill_flops(shape, [5, 3], chunk=2, batch=2) == 2 * (layer0 + layer1 + HEAD)
    assert pruned_prefill_scores(shape, [5, 3], chunk=2) == 4 * (4 + 8 + 5) + 4 * 3


def test_attention_scores_by_hand():
    shape = model_shape(mb.build_model(mb.tiny_config("openelm", n_layers=2, vocab_size=512)))
    # T=5, chunks of 2: layer 0 only in the cache-fill (2x2 + 2x4 pairs), both layers for the last token
    assert prefill_scores(shape, 5, chunk=2) == 4 * (2 * 2 + 2 * 4) + 2 * 4 * 5 == 88
    assert prefill_scores(shape, 5, chunk=2, batch=2) == 176


def test_kvp_flops_is_aux_fill_plus_predictor_plus_base_step():
    base_cfg = mb.tiny_config("openelm", n_layers=3, vocab_size=512)
    aux_cfg = {**mb.tiny_config("openelm", n_layers=2, vocab_size=512),
               "model_dim": 48, "num_query_heads": [3, 3], "num_kv_heads": [1, 1]}
    base, aux = mb.build_model(base_cfg), mb.build_model(aux_cfg)
    predictor = mb.make_predictor(base, aux)  # 3 base layers, each a key and a value map 16 -> 32
    per_position = 3 * 2 * (2 * 16 * 32 + 32)
    assert predictor_flops(predictor, 7) == 7 * per_position == 44352
    b, a = model_shape(base), model_shape(aux)
    assert kvp_flops(b, a, predictor, 8, chunk=4, batch=2) == (
        cache_fill_flops(a, 7, 4, 2) + predictor_flops(predictor, 7, 2) + step_flops(b, 7, 2)
    )
    assert kvp_flops(b, a, predictor, 1, chunk=4) == prefill_flops(b, 1, chunk=4)
    # scores: aux layer 0 (3 heads) over 7 cache-only positions in chunks of 4, then 3 base layers x 4 heads x 8 keys
    assert kvp_scores(b, a, 8, chunk=4) == 3 * (4 * 4 + 3 * 7) + 3 * 4 * 8 == 207


def _parameter_count(config: dict) -> int:
    """Parameters of an mlx-lm model built lazily (no weights are materialised)."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def test_bench_pairs_have_the_papers_shapes():
    assert PAIRS["kvp-c-270m"] == ("OpenELM-1_1B", "OpenELM-270M")
    sizes = {n: _parameter_count(openelm_config(n)) for n in ("OpenELM-270M", "OpenELM-450M", "OpenELM-1_1B")}
    # published sizes (tied embeddings counted once); norms included
    assert sizes == {"OpenELM-270M": 271_527_168, "OpenELM-450M": 457_179_136, "OpenELM-1_1B": 1_079_891_456}
    full = openelm_config("OpenELM-1_1B")
    assert full["vocab_size"] == 32000 and full["head_dim"] == 64
    assert full["num_query_heads"][0] == 16 and full["num_query_heads"][-1] == 32
    assert full["num_kv_heads"] == [h // 4 for h in full["num_query_heads"]]
    lp25 = openelm_config(PAIRS["kvp-lp-0.25"][1])  # layers 0, 4, ..., 24 of the full model
    assert lp25["num_query_heads"] == full["num_query_heads"][::4]
    assert lp25["ffn_multipliers"] == full["ffn_multipliers"][::4]
    lp50 = openelm_config(PAIRS["kvp-lp-0.50"][1])  # 14 layers, ramps ending one full-depth step short
    assert lp50["num_transformer_layers"] == 14 and lp50["ffn_multipliers"][-1] == 3.87
    assert openelm_config(PAIRS["3b-kvp-c-1.1b"][0])["head_dim"] == 128


def test_interleaved_schedule_rotates():
    assert interleaved_schedule(["a", "b", "c"], warmup=1, repetitions=3) == [
        (-1, "c"), (-1, "a"), (-1, "b"),
        (0, "a"), (0, "b"), (0, "c"),
        (1, "b"), (1, "c"), (1, "a"),
        (2, "c"), (2, "a"), (2, "b"),
    ]


def test_run_interleaved_order_samples_and_skips():
    calls = []

    def timer(label, seconds):
        def measure():
            calls.append(label)
            return seconds
        return measure

    def broken():
        calls.append("x")
        raise RuntimeError("needs setup")

    cases = [Case("a", timer("a", 1.0)), Case("x", broken), Case("b", timer("b", 2.0))]
    run_interleaved(cases, warmup=1, repetitions=2, log=lambda _: None)
    # warm-up (rotated by -1): b, a, x; then a, x(skipped), b; then x(skipped), b, a
    assert calls == ["b", "a", "x", "a", "b", "b", "a"]
    assert cases[0].samples == [1.0, 1.0] and cases[2].samples == [2.0, 2.0]
    assert cases[1].skipped == "RuntimeError: needs setup" and cases[1].samples == []
    assert cases[0].summary() == {"median_s": 1.0, "min_s": 1.0, "max_s": 1.0, "iqr_s": 0.0}


def test_tiny_run_writes_json_and_markdown(random_pair_dir, tmp_path, capsys):
    rc = ttft_main(["--model", str(random_pair_dir), "--prompt-lengths", "6,9", "--batch-sizes", "1,2",
               "--repetitions", "1", "--prefill-step-size", "4", "--out", str(tmp_path), "--name", "tiny",
               "--no-plots"])
    assert rc == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["schema"] == "kvp-mlx-bench/1"
    env = result["environment"]
    for key in ("mlx", "mlx-lm", "device", "blas", "cpu"):
        assert env[key]
    assert result["settings"]["prefill_step_size"] == 4 and result["settings"]["repetitions"] == 1
    assert result["command"].startswith("python -m bench.ttft ") and "--prefill-step-size 4" in result["command"]
    assert [(r["prompt_tokens"], r["batch"]) for r in result["runs"]] == [(6, 1), (9, 1), (6, 2), (9, 2)]
    for run in result["runs"]:
        assert run["device"] == "cpu" and run["dtype"] == "float32"
        cases = {c["label"]: c for c in run["cases"]}
        expected = {"base", "kvp[aux]", "aux[aux]", "aux-prefill[aux]", "base-step"}
        assert expected <= set(cases)
        assert ("mlx-lm" in cases) == (run["batch"] == 1)  # mlx-lm's stream_generate is single-prompt
        for c in run["cases"]:
            assert len(c["samples_s"]) == 1 and c["median_s"] == c["samples_s"][0] > 0
        for label in expected:
            assert cases[label]["flops"] > 0 and cases[label]["attention_scores"] > 0
        assert cases["base"]["speedup_measured"] == 1.0 and cases["base"]["speedup_flops"] == 1.0
        kvp = cases["kvp[aux]"]
        assert kvp["speedup_flops"] == pytest.approx(cases["base"]["flops"] / kvp["flops"])
        assert kvp["realised"] == pytest.approx(kvp["speedup_measured"] / kvp["speedup_flops"])
        assert cases["base-step"]["speedup_measured"] is None  # components have no speedup
        checks = {c["check"] for c in run["checks"]}
        assert "kvp[aux] TTFT within 15% of aux prefill (T-1) + one base step" in checks
        assert ("base TTFT within 5% of plain mlx-lm" in checks) == (run["batch"] == 1)
    md = (tmp_path / "tiny.md").read_text()
    assert "| model | device | dtype | T | B | case |" in md and "| kvp[aux] |" in md and "## Checks" in md
    assert not list(tmp_path.glob("*.png"))
    assert "wrote" in capsys.readouterr().out
    # re-rendering from the JSON measures nothing and writes the same markdown
    (tmp_path / "tiny.md").unlink()
    assert ttft_main(["--from-json", str(tmp_path / "tiny.json"), "--no-plots"]) == 0
    assert (tmp_path / "tiny.md").read_text() == md


def test_plots_say_what_is_missing_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    files, note = write_plots({"runs": []}, tmp_path, "x")
    assert files == [] and "pip install matplotlib" in note


def test_plots_are_written(random_pair_dir, tmp_path):
    pytest.importorskip("matplotlib")
    assert ttft_main(["--model", str(random_pair_dir), "--prompt-lengths", "4,8", "--methods", "base,kvp",
                 "-n", "1", "--out", str(tmp_path), "--name", "p"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["p-speedup.png", "p-ttft.png"]


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU")
def test_gpu_is_skipped_with_a_message(random_pair_dir, tmp_path, capsys):
    rc = ttft_main(["--device", "gpu", "--model", str(random_pair_dir), "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "no GPU is available to MLX" in out and "skipping --device gpu" in out
    assert not list(tmp_path.iterdir())


def test_bad_options_are_one_line_errors(random_pair_dir, capsys):
    assert ttft_main(["--model", str(random_pair_dir), "--methods", "nope"]) == 1
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert ttft_main(["--pairs", "kvp-c-9b"]) == 1
    assert "unknown model pair(s) kvp-c-9b" in capsys.readouterr().err


def _record(label: str, samples: list[float], method: str = "", flops: int | None = None, aux=None) -> dict:
    return {"label": label, "method": method or label, "aux": aux, "samples_s": samples,
            "median_s": sorted(samples)[len(samples) // 2], "flops": flops}


def test_checks_use_paired_ratios():
    records = [
        _record("base", [10.0, 20.0, 12.0], flops=400),
        _record("mlx-lm", [10.2, 26.0, 12.1]),
        _record("kvp[a]", [2.5, 5.0, 3.0], method="kvp", flops=100, aux="a"),
        _record("aux-prefill[a]", [2.0, 4.0, 2.5], method="aux-prefill", aux="a"),
        _record("base-step", [0.2, 0.4, 0.3], method="base-step"),
    ]
    assert paired_ratio(records, ["base"], ["mlx-lm"]) == pytest.approx(10.0 / 10.2)  # median of 0.98, 0.77, 0.99
    result = {c["check"]: c for c in checks(records)}
    anchor = result["base TTFT within 5% of plain mlx-lm"]
    assert anchor["passed"] and anchor["ratio_of_medians"] == pytest.approx(12.0 / 12.1)
    parts = result["kvp[a] TTFT within 15% of aux prefill (T-1) + one base step"]
    assert parts["value"] == pytest.approx(2.5 / 2.2) and parts["passed"]  # 1.136, 1.136, 1.071
    # measured base/kvp = 4.0 in every repetition; FLOPs predict 4.0: fully realised
    realised = result["kvp[a] measured speedup >= 85% of FLOPs-predicted"]
    assert realised["value"] == pytest.approx(1.0) and realised["passed"]
    records[2]["samples_s"] = [3.0, 6.0, 3.6]  # measured 3.33x of 4x predicted: 83%
    assert not {c["check"]: c for c in checks(records)}["kvp[a] measured speedup >= 85% of FLOPs-predicted"]["passed"]


def test_softmax_share_composite_attention_is_mlx_attention():
    """The diagnostic's composite kernel computes mx.fast's attention; the no-softmax one does not."""
    from bench.softmax_share import check_composite, no_softmax_attention

    assert check_composite() < 1e-5
    q, k, v = (mx.random.normal(s, key=mx.random.key(i)) for i, s in
               enumerate([(1, 4, 8, 64), (1, 2, 24, 64), (1, 2, 24, 64)]))
    fast = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    assert no_softmax_attention(q, k, v, None, 0.125, "causal").shape == fast.shape
    assert mx.abs(no_softmax_attention(q, k, v, None, 0.125, "causal") - fast).max().item() > 0.1


def test_kvp_mlx_bench_times_a_users_model(random_pair_dir, capsys):
    """`kvp-mlx bench --model DIR` (the runtime's own, not the lab's suite): base, kvp and mlx-lm."""
    from kvp_mlx.cli import main

    assert main(["bench", "--model", str(random_pair_dir), "-p", "12", "-g", "3", "-n", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    rows = {line.split("|")[1].strip(): line for line in lines}
    assert set(rows) == {"case", "base", "kvp", "mlx-lm"}, out
    assert "| 1.00x |" in rows["mlx-lm"]
    assert main(["bench", "--model", str(random_pair_dir), "--methods", "nope"]) == 1
    assert "unknown prefill method 'nope'" in capsys.readouterr().err
