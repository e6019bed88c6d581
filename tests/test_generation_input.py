"""Input to `kvp-mlx generate` is checked before any work: each bad input is one `error:` line and
exit 1 (or, where documented, a one-line note or warning and a normal run)."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from kvp_mlx.cli import main as kvp_main
from kvp_mlx.errors import KVPError
from kvp_mlx.generation import generate


def run(capsys, *argv: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = kvp_main(["generate", *argv])
    out = capsys.readouterr()
    return code, [line for line in out.err.strip().splitlines() if line], out.out


def assert_one_line_error(code: int, err: list[str], text: str) -> None:
    """Exit 1 and exactly one ``error:`` line holding ``text`` (a ``note:`` about the model may precede it)."""
    assert code == 1, err
    errors = [line for line in err if not line.startswith("note: ")]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert text in errors[0], errors[0]


@pytest.mark.parametrize("flags, text", [
    (["--temp", "-1"], "temp must be >= 0"),
    (["--temp", "nan"], "temp must be a finite number"),
    (["--temp", "inf"], "temp must be a finite number"),
    (["--top-p", "2"], "top_p must lie in [0, 1], got 2.0"),
    (["--top-p", "-0.1"], "top_p must lie in [0, 1]"),
    (["--min-p", "1.5"], "min_p must lie in [0, 1], got 1.5"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--repetition-penalty", "0"], "repetition_penalty must be positive"),
    (["--xtc-probability", "3"], "xtc_probability must lie in [0, 1]"),
    (["--logit-bias", "{nope"], "--logit-bias is not valid JSON"),
    (["--logit-bias", '{"99999": 1.0}'], "logit_bias: token id 99999 is not in [0, "),
    (["--chat-template-config", "[1]"], "--chat-template-config must be a JSON object"),
    (["--max-tokens", "0"], "max_tokens must be a positive integer"),
    (["--kv-bits", "7"], "kv_bits must be one of 2, 3, 4, 5, 6, 8"),
    (["--max-kv-size", "0"], "max_kv_size must be a positive integer"),
    (["--prefill-step-size", "0"], "prefill_step_size must be a positive integer"),
])
def test_out_of_range_options_are_one_line_errors(random_pair_dir, capsys, flags, text):
    code, err, out = run(capsys, "--model", str(random_pair_dir), "--prompt", "hello", *flags)
    assert_one_line_error(code, err, text)
    assert out == ""


def test_prompt_bytes_that_are_not_utf8(random_pair_dir, capsys, monkeypatch):
    # on the command line: Python hands undecodable argv bytes over as surrogate escapes
    code, err, _ = run(capsys, "--model", str(random_pair_dir), "--prompt", "ab\udcffc")
    assert_one_line_error(code, err, "--prompt is not valid UTF-8: byte 0xff at byte offset 2")
    # on standard input
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("héllo".encode() + b"\xc3(")))
    code, err, _ = run(capsys, "--model", str(random_pair_dir), "--prompt", "-")
    assert_one_line_error(code, err, "standard input is not valid UTF-8: byte 0xc3 at byte offset 6")


def test_prompt_longer_than_the_context(random_pair_dir, tmp_path, capsys):
    model_dir = tmp_path / "short"
    shutil.copytree(random_pair_dir, model_dir)
    config_path = model_dir / "base" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "max_context_length": 8}))
    prompt = "def f(x): return x + 1  # a prompt of more than eight tokens"
    code, err, out = run(capsys, "--model", str(model_dir), "--prompt", prompt, "--max-tokens", "2")
    assert code == 0
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 1 and "more than the model's context of 8 (max_context_length)" in warnings[0], err
    code, err, out = run(capsys, "--model", str(model_dir), "--prompt", prompt, "--strict-context")
    assert_one_line_error(code, err, "more than the model's context of 8 (max_context_length) (--strict-context)")
    assert out == ""


def test_compare_with_sampling_says_it_compares_greedily(random_pair_dir, capsys):
    code, err, out = run(capsys, "--model", str(random_pair_dir), "--prompt", "def f(x):", "--max-tokens", "4",
                         "--compare", "--temp", "0.8")
    assert code == 0
    assert any("--compare decodes both methods greedily" in line for line in err), err
    assert "greedy continuations: first tokens agree:" in out
    assert "TTFT base" in out and "prompt tokens/s base" in out


def test_compare_reports_where_continuations_diverge(random_pair_dir, capsys):
    code, _, out = run(capsys, "--model", str(random_pair_dir), "--prompt", "def f(x):", "--max-tokens", "6",
                       "--compare")
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert last.startswith("greedy continuations: first tokens agree: ")
    assert "identical for all 6 tokens" in last or "first differ at generated token" in last


def test_quiet_prints_the_text_alone(random_pair_dir, capsys):
    _, _, verbose = run(capsys, "--model", str(random_pair_dir), "--prompt", "hello", "--max-tokens", "5")
    code, _, quiet = run(capsys, "--model", str(random_pair_dir), "--prompt", "hello", "--max-tokens", "5",
                         "--verbose", "False")
    assert code == 0
    assert "TTFT" not in quiet and "=" * 10 not in quiet
    assert verbose.split("=" * 10)[1].strip("\n") == quiet.rstrip("\n")
    _, _, q = run(capsys, "--model", str(random_pair_dir), "--prompt", "hello", "--max-tokens", "5", "--quiet")
    assert q == quiet


def test_api_checks_too(random_pair_dir):
    from kvp_mlx.model import load

    model = load(random_pair_dir)
    with pytest.raises(KVPError, match="top_p must lie in"):
        generate(model, "hi", top_p=1.5)
    with pytest.raises(KVPError, match="unknown keyword 'tempp' \\(did you mean 'temp'\\?\\)"):
        generate(model, "hi", tempp=0.5)
    with pytest.raises(KVPError, match="has no chat template"):
        generate(model, [{"role": "user", "content": "hi"}])
    with pytest.raises(KVPError, match="needs the chat template"):
        generate(model, "hi", system_prompt="be brief")
