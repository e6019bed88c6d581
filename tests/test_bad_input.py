"""Bad input gets a one-line clear error from the CLI, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from kvp_mlx import testing as mb
from kvp_mlx.errors import KVPError
from kvp_mlx.model import MIN_TOKENIZER_COVERAGE, check_tokenizer_covers_vocab, load

from conftest import VOCAB


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvp_mlx.cli", *args], capture_output=True, text=True, input=stdin,
        timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def pair_copy(random_pair_dir, tmp_path) -> Path:
    dst = tmp_path / "pair"
    shutil.copytree(random_pair_dir, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_empty_prompt(random_pair_dir):
    assert_one_line_error(run_cli("generate", "--model", str(random_pair_dir), "--prompt", ""), "empty prompt")
    assert_one_line_error(
        run_cli("generate", "--model", str(random_pair_dir), "--prompt", "-", stdin=""), "empty prompt"
    )


def test_missing_model_dir(tmp_path):
    assert_one_line_error(
        run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"), "not found", "nope"
    )


def test_missing_predictor_file(pair_copy):
    (pair_copy / "predictor.safetensors").unlink()
    assert_one_line_error(run_cli("generate", "--model", str(pair_copy), "--prompt", "hi"),
                          "predictor.safetensors")


def test_missing_aux_dir(pair_copy):
    shutil.rmtree(pair_copy / "aux")
    assert_one_line_error(run_cli("generate", "--model", str(pair_copy), "--prompt", "hi"), "aux")


def test_tokenizer_mismatch(pair_copy, tmp_path):
    # as many pieces as the model's vocabulary, trained on other text: a different tokenizer
    other = mb.build_byte_tokenizer(tmp_path / "other", mb.default_tokenizer_texts()[::-1][:3], VOCAB)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(other / name, pair_copy / "aux" / name)
    assert_one_line_error(run_cli("generate", "--model", str(pair_copy), "--prompt", "hi"), "tokenizers differ")


def test_mapping_length_mismatch(pair_copy):
    edit_json(pair_copy / "predictor.json", mapping=[0, 1])
    assert_one_line_error(run_cli("generate", "--model", str(pair_copy), "--prompt", "hi"),
                          "mapping has 2 entries", "3 layers")


def test_mapping_index_out_of_range(pair_copy):
    edit_json(pair_copy / "predictor.json", mapping=[0, 1, 5])
    assert_one_line_error(run_cli("generate", "--model", str(pair_copy), "--prompt", "hi"), "out of range")


def test_predictor_shape_mismatch(pair_copy):
    cfg = json.loads((pair_copy / "predictor.json").read_text())
    cfg["aux_kv"][0]["heads"] = 2
    (pair_copy / "predictor.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("generate", "--model", str(pair_copy), "--prompt", "hi"), "shape")


def test_corrupt_predictor_weights(pair_copy):
    (pair_copy / "predictor.safetensors").write_bytes(b"\x00garbage")
    assert_one_line_error(run_cli("generate", "--model", str(pair_copy), "--prompt", "hi"), "predictor.safetensors")


def test_unknown_architecture(tmp_path, tokenizer_dir):
    cfg = {"model_type": "gpt2", "n_ctx": 64, "n_embd": 32, "n_head": 2, "n_layer": 1,
           "n_positions": 64, "layer_norm_epsilon": 1e-5, "vocab_size": VOCAB}
    mb.save_lm_dir(tmp_path / "gpt2", mb.build_model(cfg), cfg, tokenizer_dir)
    config = tmp_path / "gpt2" / "config.json"
    config.write_text(config.read_text().replace('"gpt2"', '"nosuchmodel"'))
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "gpt2"), "--prompt", "hi"),
                          "nosuchmodel")


def test_unknown_method_is_rejected_by_the_api(random_pair_dir):
    with pytest.raises(KVPError, match="unknown prefill method"):
        load(random_pair_dir).prefill(mx.array([[1, 2, 3]]), method="nope")


def test_ragged_and_empty_batches(random_pair_dir):
    model = load(random_pair_dir)
    with pytest.raises(KVPError, match="ragged"):
        model.prefill([[1, 2, 3], [4, 5]])
    with pytest.raises(KVPError, match="empty"):
        model.prefill(mx.zeros((1, 0), dtype=mx.int32))
    with pytest.raises(KVPError, match="token ids"):
        model.prefill(mx.array([[1, VOCAB + 3]]))


def test_base_only_directory_refuses_kvp(tmp_path, tokenizer_dir):
    cfg = mb.tiny_config("llama", 2, VOCAB)
    mb.save_lm_dir(tmp_path / "plain", mb.build_model(cfg), cfg, tokenizer_dir)
    model = load(tmp_path / "plain")
    assert model.prefill(mx.array([[1, 2, 3]]), method="base").logits.shape == (1, VOCAB)
    with pytest.raises(KVPError, match="base-only"):
        model.prefill(mx.array([[1, 2, 3]]), method="kvp")


TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def test_corrupt_or_truncated_weights_name_the_file(pair_copy, random_pair_dir):
    weights = pair_copy / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # truncated: tensor data runs past the end
    assert_one_line_error(run_cli("generate", "--model", str(pair_copy), "--prompt", "hi"),
                          f"base model weights {weights} are unreadable", "truncated")
    shutil.copy(random_pair_dir / "base" / "model.safetensors", weights)
    aux_weights = pair_copy / "aux" / "model.safetensors"
    aux_weights.write_bytes(b"\x00garbage")
    with pytest.raises(KVPError, match=f"auxiliary model weights {aux_weights} are unreadable"):
        load(pair_copy)


def test_missing_tokenizer_says_how_to_give_one(pair_copy):
    for name in TOKENIZER_NAMES:
        (pair_copy / "aux" / name).unlink(missing_ok=True)
    assert_one_line_error(run_cli("generate", "--model", str(pair_copy), "--prompt", "hi"),
                          f"auxiliary model directory {pair_copy / 'aux'} has no tokenizer",
                          "tokenizer.json", "--tokenizer")


def _replace_tokenizer(model_dir: Path, tokenizer_dir: Path) -> None:
    for role in ("base", "aux"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, model_dir / role / name)


def test_tokenizer_smaller_than_the_vocabulary(pair_copy, tmp_path):
    """Refused below 99% of the model's vocabulary; a padded embedding (the tokenizer a little
    smaller, as Qwen2.5's 151665 pieces for 151936 rows) loads."""
    limit = MIN_TOKENIZER_COVERAGE * VOCAB  # 506.88 for VOCAB 512
    small = mb.build_byte_tokenizer(tmp_path / "small", mb.default_tokenizer_texts(), int(limit))
    _replace_tokenizer(pair_copy, small)
    assert_one_line_error(run_cli("generate", "--model", str(pair_copy), "--prompt", "hi"),
                          f"has {int(limit)} pieces", f"vocabulary has {VOCAB} entries", "at least 99%")
    enough = mb.build_byte_tokenizer(tmp_path / "enough", mb.default_tokenizer_texts(), int(limit) + 1)
    _replace_tokenizer(pair_copy, enough)
    model = load(pair_copy)
    assert len(model.tokenizer.get_vocab()) == int(limit) + 1
    assert model.prefill(mx.array([[1, 2, 3]]), method="kvp").logits.shape == (1, VOCAB)
    check_tokenizer_covers_vocab(151665, 151936, "Qwen2.5's tokenizer")
    check_tokenizer_covers_vocab(32000, 32128, "corenet's LLaMA-2 tokenizer for a padded embedding")
    with pytest.raises(KVPError, match="has 32000 pieces but the model's vocabulary has 32768"):
        check_tokenizer_covers_vocab(32000, 32768, "a tokenizer")


def test_random_timing_models_cover_their_vocabulary(tmp_path):
    """`python -m bench.runahead` builds an OpenELM-270M-shaped model (32000 rows) with a small test
    tokenizer, padded so that the loading rule accepts it."""
    from bench.runahead import build_bench_model

    model = load(build_bench_model(tmp_path / "bench", "OpenELM-270M", n_layers=1))
    assert len(model.tokenizer.get_vocab()) == model.base.args.vocab_size == 32000
    ids = model.tokenizer.encode("def f(x): return x")
    assert max(ids) < 512 and model.tokenizer.decode(ids).endswith("def f(x): return x")
