"""Predictor-only KV Prediction directories: kvp_config.json names the base and auxiliary models
(relative path, absolute path, Hugging Face repo id, or base layers for KVP-LP) instead of holding
copies. Each form must give exactly the logits of the self-contained directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from kvp_mlx import testing as mb
from kvp_mlx.errors import KVPError
from kvp_mlx.model import KVP_CONFIG, load, write_kvp_config
from kvp_mlx.training.kvp_run import KVPRunConfig, run_kvp_training
from kvp_mlx.training.loop import TrainConfig

from conftest import VOCAB

TOKENS = mx.array([[5, 17, 42, 99, 7, 3, 250, 11]])
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvp_mlx.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def first_logits(directory: Path) -> mx.array:
    return load(directory, dtype="float32").prefill(TOKENS, method="kvp").logits


def predictor_only(directory: Path, predictor_dir: Path, base, aux) -> Path:
    """A predictor-only directory: the predictor files of ``predictor_dir`` and references."""
    directory.mkdir(parents=True)
    for name in ("predictor.json", "predictor.safetensors"):
        shutil.copy(predictor_dir / name, directory / name)
    write_kvp_config(directory, "test predictor-only", base=base, aux=aux)
    return directory


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """base/ and aux/ model directories, and the self-contained KVP directory holding copies of them."""
    root = tmp_path_factory.mktemp("predonly")
    base_cfg = mb.tiny_config("openelm", n_layers=3, vocab_size=VOCAB)
    aux_cfg = mb.tiny_config("openelm", n_layers=2, vocab_size=VOCAB)
    aux_cfg.update(model_dim=48, num_query_heads=[3, 3], num_kv_heads=[1, 1])
    base, aux = mb.build_model(base_cfg, seed=1), mb.build_model(aux_cfg, seed=2)
    pred = mb.make_predictor(base, aux, init="random", seed=3)
    full = mb.save_kvp_dir(root / "full", base, base_cfg, aux, aux_cfg, pred, tokenizer_dir, "test pair")
    mb.save_lm_dir(root / "models" / "base", base, base_cfg, tokenizer_dir)
    mb.save_lm_dir(root / "models" / "aux", aux, aux_cfg, tokenizer_dir)
    return {"root": root, "full": full, "base": root / "models" / "base", "aux": root / "models" / "aux"}


def test_relative_paths_load_like_the_self_contained_directory(models):
    d = predictor_only(models["root"] / "rel", models["full"], "../models/base", "../models/aux")
    assert json.loads((d / KVP_CONFIG).read_text())["format_version"] == 2
    assert mx.array_equal(first_logits(d), first_logits(models["full"]))
    assert sorted(p.name for p in d.iterdir()) == ["kvp_config.json", "predictor.json", "predictor.safetensors"]
    print(f"\npredictor-only: {dir_bytes(d)} bytes; self-contained: {dir_bytes(models['full'])} bytes")


def test_absolute_and_home_paths_load_like_the_self_contained_directory(models, monkeypatch, tmp_path):
    d = predictor_only(tmp_path / "abs", models["full"], str(models["base"]), str(models["aux"]))
    want = first_logits(models["full"])
    assert mx.array_equal(first_logits(d), want)
    monkeypatch.setenv("HOME", str(models["root"]))
    home = predictor_only(tmp_path / "home", models["full"], "~/models/base", {"path": "~/models/aux"})
    assert mx.array_equal(first_logits(home), want)


def test_a_relative_entry_is_not_looked_up_in_the_working_directory(models, monkeypatch, tmp_path):
    d = predictor_only(tmp_path / "kvp", models["full"], "models/base", "models/aux")
    monkeypatch.chdir(models["root"])  # models/base exists relative to the cwd, not to the KVP dir
    with pytest.raises(KVPError, match=r"^base model 'models/base' named in .*kvp_config.json: not found"):
        load(d)


@pytest.fixture
def hf_cache(models, tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding someone/tiny-base and someone/tiny-aux, offline."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    for name, src in (("tiny-base", models["base"]), ("tiny-aux", models["aux"])):
        repo = cache / f"models--someone--{name}"
        shutil.copytree(src, repo / "snapshots" / SNAPSHOT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(SNAPSHOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at import; set for this process too
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_repo_ids_resolve_from_the_hf_cache_offline(models, hf_cache, tmp_path):
    d = predictor_only(tmp_path / "hub-kvp", models["full"], "someone/tiny-base",
                       {"path": "someone/tiny-aux", "revision": SNAPSHOT})
    assert mx.array_equal(first_logits(d), first_logits(models["full"]))
    absent = predictor_only(tmp_path / "absent", models["full"], "someone/tiny-base", "someone/absent")
    with pytest.raises(KVPError) as e:
        load(absent)
    msg = str(e.value)
    assert msg.startswith("auxiliary model 'someone/absent' named in") and "not found" in msg
    assert "HF_HUB_OFFLINE" in msg and "\n" not in msg
    wrong_rev = predictor_only(tmp_path / "rev", models["full"], {"path": "someone/tiny-base", "revision": "f" * 40},
                               "someone/tiny-aux")
    with pytest.raises(KVPError, match="^base model .*someone/tiny-base.* not found"):
        load(wrong_rev)


def test_repo_ids_through_the_cli_offline(models, hf_cache, tmp_path):
    d = predictor_only(tmp_path / "cli-kvp", models["full"], "someone/tiny-base", "someone/tiny-aux")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_cache)}
    ok = cli("generate", "--model", str(d), "--prompt", "hello", "--max-tokens", "2", env=env)
    assert ok.returncode == 0, ok.stderr
    bad = predictor_only(tmp_path / "cli-bad", models["full"], "someone/nothing-here", "someone/tiny-aux")
    proc = cli("generate", "--model", str(bad), "--prompt", "hello", "--max-tokens", "2", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: base model 'someone/nothing-here' named in "), lines


@pytest.mark.parametrize("base, aux, message", [
    ("../nowhere/base", "../models/aux", r"^base model '../nowhere/base' named in .*: not found \(no directory"),
    ("../models/base", "/no/such/aux", r"^auxiliary model '/no/such/aux' named in .*: not found"),
    ("../models/base/config.json", "../models/aux", r"^base model .*: not a directory$"),
    ("../models/base", {"repo": "x/y"}, r"^auxiliary model \{\"repo\": \"x/y\"\} named in .*: expected "),
    ("../models/base", 7, r"^auxiliary model 7 named in .*: expected a path or a Hugging Face repo id$"),
    ("../models/base", {"base_layers": [0, 5]}, r"^auxiliary model named in .*: layers to keep must be"),
    ("../models/base", {"base_layers": "0,1"}, r"^auxiliary model named in .*: base_layers must be a list"),
], ids=["missing-relative", "missing-absolute", "a-file", "unknown-key", "not-a-string", "layer-out-of-range",
        "layers-not-a-list"])
def test_unresolvable_entries_give_one_line_errors(models, base, aux, message, request):
    d = models["root"] / f"err-{request.node.callspec.id}"
    predictor_only(d, models["full"], base, aux)
    with pytest.raises(KVPError, match=message) as e:
        load(d)
    assert "\n" not in str(e.value)


def test_a_newer_format_version_asks_for_an_upgrade(models, tmp_path):
    d = predictor_only(tmp_path / "v9", models["full"], "../models/base", "../models/aux")
    cfg = json.loads((d / KVP_CONFIG).read_text())
    (d / KVP_CONFIG).write_text(json.dumps({**cfg, "format_version": 9}))
    with pytest.raises(KVPError, match="version 9 .*upgrade kvp-mlx"):
        load(d)


def test_the_self_contained_form_stays_version_1(models):
    cfg = json.loads((models["full"] / KVP_CONFIG).read_text())
    assert (cfg["format_version"], cfg["base"], cfg["aux"]) == (1, "base", "aux")


# --- the trainer ------------------------------------------------------------------------------

def run_config(pair, out: str, **kw) -> KVPRunConfig:
    return KVPRunConfig(
        base=str(pair["base"]), data=[str(pair["data"])], out=str(pair["root"] / out), seq_len=32,
        batch_size=4, calibration_batches=4, aux_train="none",
        train=TrainConfig(steps=0, warmup_steps=0, eval_every=1000, save_every=1000), **kw,
    )


@pytest.mark.parametrize("kind", ["kvp-c", "kvp-lp"])
def test_trainer_writes_a_predictor_only_directory(train_pair, kind):
    aux = {"aux": str(train_pair["aux"])} if kind == "kvp-c" else {"aux_layers": [0, 3]}
    run_kvp_training(run_config(train_pair, f"{kind}-full", **aux), force=True)
    run_kvp_training(run_config(train_pair, f"{kind}-pred", predictor_only=True, **aux), force=True)
    full, pred = train_pair["root"] / f"{kind}-full", train_pair["root"] / f"{kind}-pred"
    assert sorted(p.name for p in pred.iterdir()) == [
        "kvp_config.json", "predictor.json", "predictor.safetensors", "train_history.json", "training.json"]
    cfg = json.loads((pred / KVP_CONFIG).read_text())
    assert cfg["base"] == str(train_pair["base"].resolve())
    assert cfg["aux"] == (str(train_pair["aux"].resolve()) if kind == "kvp-c" else {"base_layers": [0, 3]})
    assert mx.array_equal(first_logits(pred), first_logits(full))
    print(f"\n{kind}: predictor-only {dir_bytes(pred)} bytes; self-contained {dir_bytes(full)} bytes")


def test_trainer_names_a_repo_id_as_given(train_pair, tokenizer_dir, monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--train-base"
    shutil.copytree(train_pair["base"], repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    cfg = run_config(train_pair, "repo-pred", aux_layers=[1, 2], predictor_only=True)
    cfg.base = "someone/train-base"
    run_kvp_training(cfg, force=True)
    written = json.loads((Path(cfg.out) / KVP_CONFIG).read_text())
    assert (written["base"], written["aux"]) == ("someone/train-base", {"base_layers": [1, 2]})
    assert load(cfg.out).prefill(TOKENS, method="kvp").logits.shape == (1, VOCAB)


def test_predictor_only_needs_an_untrained_auxiliary(train_pair):
    cfg = run_config(train_pair, "never", aux=str(train_pair["aux"]), predictor_only=True)
    cfg.aux_train = "lora"
    with pytest.raises(KVPError, match="^--predictor-only needs --aux-train none: .*must be saved") as e:
        run_kvp_training(cfg)
    assert "\n" not in str(e.value) and not Path(cfg.out).exists()
    proc = cli("train", "--base", str(train_pair["base"]), "--aux", str(train_pair["aux"]), "--data",
               str(train_pair["data"]), "--out", str(train_pair["root"] / "cli-never"), "--predictor-only")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: " + str(e.value).replace("--aux-train lora", "--aux-train full")]


# --- KVP-LP from a quantized base -------------------------------------------------------------

def test_base_layers_of_a_4bit_base(tmp_path, tokenizer_dir):
    """An mlx-community-style 4-bit base: the layer-pruned auxiliary is quantized like it, and
    keeping every layer reproduces the base exactly."""
    cfg = mb.tiny_config("llama", n_layers=3, vocab_size=VOCAB)
    base = mb.build_model(cfg, seed=4)
    nn.quantize(base, group_size=32, bits=4)
    qcfg = {**cfg, "quantization": {"group_size": 32, "bits": 4}}
    mb.save_lm_dir(tmp_path / "base-4bit", base, qcfg, tokenizer_dir)
    for keep in ([0, 1, 2], [0, 2]):
        aux, _ = mb.layer_pruned(base, qcfg, keep)
        pred = mb.make_predictor(base, aux, init="random", seed=5)
        d = tmp_path / f"lp-{len(keep)}"
        pred.save(d)
        write_kvp_config(d, "test 4-bit KVP-LP", base="../base-4bit", aux={"base_layers": keep})
        model = load(d, dtype="float32")
        assert isinstance(model.aux.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        assert model.prefill(TOKENS, method="kvp").logits.shape == (1, VOCAB)
        if len(keep) == 3:
            assert mx.array_equal(model.aux(TOKENS), model.base(TOKENS))
