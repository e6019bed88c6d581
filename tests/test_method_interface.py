"""The prefill interface: a method declared outside the package reaches the CLI and the benchmark
through its declaration alone; wrong options are one-line errors; methods never import the model."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import pytest

from bench.cases import all_method_names, benchmark_config, method_listing
from bench.models import load_group
from kvp_mlx.cli import build_parser
from kvp_mlx.cli import main as cli_main
from kvp_mlx.errors import KVPError
from kvp_mlx.methods import (
    Capabilities, Cost, Option, PrefillMethod, PrefillResult, get_method, register, unregister,
)
from kvp_mlx.methods.base import plain_prefill
from kvp_mlx.model import load

CALLS: list[dict] = []


def prefill_scaled(model, tokens: mx.array, prefill_step_size: int = 2048, factor: float = 1.0,
                   label: str = "x") -> PrefillResult:
    """A dummy method: plain base prefill, logits scaled by ``factor``."""
    CALLS.append({"factor": factor, "label": label})
    cache, logits = plain_prefill(model.base, tokens, prefill_step_size)
    return PrefillResult(cache, logits * factor, model.base, "scaled", {"factor": factor})


SCALED = PrefillMethod(
    name="scaled",
    summary="a test method: base prefill with scaled logits",
    prefill=prefill_scaled,
    options=(
        Option("factor", float, 1.0, "logit scale", check=lambda v: None if v > 0 else "must be positive"),
        Option("label", str, "x", "a label", choices=("x", "y")),
    ),
    capabilities=Capabilities(batch=False),
    cost=lambda model, tokens, chunk, batch, info: Cost(flops=1000 * tokens, attention_scores=tokens),
)


@pytest.fixture()
def scaled_method():
    register(SCALED)
    CALLS.clear()
    yield SCALED
    unregister("scaled")


def generate_help() -> str:
    parser = build_parser("generate")
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["generate"].format_help()


def test_declared_method_reaches_help_and_benchmark(scaled_method):
    text = generate_help()
    assert "--method scaled" in text and "--scaled-factor" in text and "--scaled-label" in text
    assert "logit scale" in text
    assert "scaled" in all_method_names()
    assert "scaled (factor=1.0, label=x)" in method_listing()


def test_declared_method_runs_from_the_cli_and_the_api(scaled_method, random_pair_dir, capsys):
    code = cli_main(["generate", "--model", str(random_pair_dir), "--prompt", "def f(x):", "--method", "scaled",
                     "--scaled-factor", "2.5", "--scaled-label", "y", "--max-tokens", "2"])
    assert code == 0
    assert CALLS[-1] == {"factor": 2.5, "label": "y"}
    model = load(random_pair_dir)
    tokens = mx.array([[1, 2, 3, 4]])
    base = model.prefill(tokens, method="base")
    scaled = model.prefill(tokens, method="scaled", factor=2)  # an int is a valid float
    assert mx.allclose(scaled.logits, base.logits * 2).item()


@pytest.mark.parametrize("flags, message", [
    (["--scaled-factor", "abc"], "error: --scaled-factor expects a number, got 'abc'"),
    (["--scaled-factor", "-1"], "error: --scaled-factor: must be positive"),
    (["--scaled-factor", "nan"], "error: --scaled-factor must be a finite number"),
    (["--scaled-label", "z"], "error: --scaled-label must be one of x, y, got 'z'"),
    (["--rp-keep", "0.5"], "error: --rp-keep applies to --method rp"),
])
def test_wrong_option_values_are_one_line_errors(scaled_method, random_pair_dir, capsys, flags, message):
    code = cli_main(["generate", "--model", str(random_pair_dir), "--prompt", "hi", "--method", "scaled", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith(message), err
    assert CALLS == []  # refused before any work


def test_api_options_are_checked(scaled_method, random_pair_dir):
    model = load(random_pair_dir)
    tokens = mx.array([[1, 2, 3]])
    with pytest.raises(KVPError, match="method 'scaled' has no option 'factr' \\(its options: factor, label\\)"):
        model.prefill(tokens, method="scaled", factr=2.0)
    with pytest.raises(KVPError, match="option 'factor' of method 'scaled' expects float, got str"):
        model.prefill(tokens, method="scaled", factor="2")
    with pytest.raises(KVPError, match="option 'label' of method 'scaled' expects str, got int"):
        model.prefill(tokens, method="scaled", label=3)
    with pytest.raises(KVPError, match="runs one prompt at a time"):
        model.prefill(mx.array([[1, 2], [3, 4]]), method="scaled")
    with pytest.raises(KVPError, match="has no option 'schedule'"):
        model.prefill(tokens, method="kvp", schedule="L0.75-0.5")
    with pytest.raises(KVPError, match="unknown prefill method 'nope'"):
        model.prefill(tokens, method="nope")
    assert CALLS == []


def test_benchmark_times_a_declared_method_with_its_cost(scaled_method, random_pair_dir):
    group = load_group(random_pair_dir)
    run = benchmark_config(group, prompt_tokens=6, batch=1, chunk=4, methods=["base", "scaled", "runahead"],
                           warmup=1, repetitions=1)
    by_label = {c["label"]: c for c in run["cases"]}
    assert by_label["scaled"]["flops"] == 6000 and by_label["scaled"]["attention_scores"] == 6
    assert by_label["scaled"]["median_s"] > 0
    assert by_label["base"]["flops"] == get_method("base").cost(group.base_only, 6, 4, 1, {}).flops
    skipped = {s["label"]: s["reason"] for s in run["skipped"]}
    assert "several processes" in skipped["runahead"]
    batch_run = benchmark_config(group, prompt_tokens=6, batch=2, chunk=4, methods=["scaled"], warmup=1,
                                 repetitions=1)
    assert [s["label"] for s in batch_run["skipped"]] == ["scaled"]


def test_methods_do_not_import_the_model_module():
    code = ("import sys, kvp_mlx, kvp_mlx.methods; "
            "bad = [m for m in sys.modules if m == 'kvp_mlx.model']; print(bad); assert not bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
