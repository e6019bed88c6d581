"""End to end: corenet reference checkpoints -> converted directories -> corenet's own outputs.

Each fixture case (tests/fixtures/corenet, produced by corenet's PyTorch code) is converted, then
the base and auxiliary models must reproduce corenet's logits through plain `mlx_lm.load`, and
KV Prediction through `kvp_mlx.load(...).prefill(...)` must reproduce corenet's first-token
logits and greedy continuation.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import kvp_mlx
import mlx.core as mx
import mlx_lm

from convert_helpers import (
    CASES,
    FIXTURES,
    edit_yaml,
    fixture_arrays,
    fixture_tokenizer,
    rewrite_checkpoint,
    single_model_yaml,
    tensor,
    write_model_configs,
    write_torch_zip,
)
from kvp_mlx.convert import cli
from kvp_mlx.convert.cli import convert_checkpoint, main
from kvp_mlx.errors import KVPError
from kvp_mlx.model import load

TOL = 1e-4


def reference(case: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / f"{case}.npz"))


def config_args(case: str, tmp: Path) -> dict[str, Path]:
    """--base-config / --aux-config for the pub-* models (gpt-test uses corenet's tables)."""
    if case == "pub_kvpc_gpt_test":
        return {}
    paths = write_model_configs(case, tmp)
    return {"base_config": paths["base"], "aux_config": paths["aux"]}


def cli_args(case: str, tmp: Path, out: Path, *extra: str, checkpoint: Path | None = None) -> list[str]:
    args = ["--checkpoint", str(checkpoint or FIXTURES / f"{case}.pt"), "--config", str(FIXTURES / f"{case}.yaml")]
    for key, path in config_args(case, tmp).items():
        args += [f"--{key.replace('_', '-')}", str(path)]
    return args + ["--out", str(out), *extra]


def greedy(model, result, steps: int = 8) -> np.ndarray:
    """argmax of the prefill logits, then ``steps - 1`` single-token base steps on its cache."""
    tok = mx.argmax(result.logits, axis=-1)
    out = [tok]
    for _ in range(steps - 1):
        tok = mx.argmax(model.base(tok[:, None], cache=result.cache)[:, -1], axis=-1)
        out.append(tok)
    return np.array(mx.stack(out, axis=1))


def max_diff(a, b) -> float:
    if isinstance(a, mx.array):
        a = a.astype(mx.float32)
    return float(np.abs(np.array(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


def no_leftovers(parent: Path) -> bool:
    return not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def vocab_size(case: str) -> int:
    return json.loads((FIXTURES / f"{case}.arch.json").read_text())["base"]["vocab_size"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """Per case, a SentencePiece model with the case's vocabulary size (the fixtures ship none)."""
    by_size = {v: fixture_tokenizer(tmp_path_factory.mktemp(f"sp{v}"), v) for v in {vocab_size(c) for c in CASES}}
    return {case: by_size[vocab_size(case)] for case in CASES}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizers) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    return {
        case: convert_checkpoint(
            FIXTURES / f"{case}.pt", FIXTURES / f"{case}.yaml", root / case,
            tokenizer=tokenizers[case], **config_args(case, root),
        )
        for case in CASES
    }


@pytest.mark.parametrize("case", CASES)
def test_layout_and_configs(converted, case):
    out = converted[case]
    arch = json.loads((FIXTURES / f"{case}.arch.json").read_text())
    kvp_config = json.loads((out / "kvp_config.json").read_text())
    assert kvp_config["format"] == "kvp-mlx" and kvp_config["format_version"] == 1
    assert (kvp_config["base"], kvp_config["aux"]) == ("base", "aux") and case in kvp_config["source"]
    predictor = json.loads((out / "predictor.json").read_text())
    assert predictor["mapping"] == arch["mapping"]
    for role in ("base", "aux"):
        cfg = json.loads((out / role / "config.json").read_text())
        assert cfg["model_type"] == "openelm"
        for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers", "head_dim", "model_dim", "vocab_size"):
            assert cfg[key] == arch[role][key], key
        assert [s["heads"] for s in predictor[f"{role}_kv"]] == arch[role]["num_kv_heads"]
        for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (out / role / name).is_file()
        assert cfg["max_context_length"] == 64  # the YAML's general_gpt.max_context_length (HF OpenELM's name)
    assert sorted(mx.load(str(out / "predictor.safetensors"))) == sorted(
        f"{kind}.{i}.{p}" for kind in ("key_transforms", "value_transforms")
        for i in range(len(arch["mapping"])) for p in ("weight", "bias")
    )


@pytest.mark.parametrize("case", CASES)
def test_base_and_aux_logits_match_corenet(converted, case):
    ref = reference(case)
    prompt = mx.array(ref["prompt"])
    base, _ = mlx_lm.load(str(converted[case] / "base"))
    aux, _ = mlx_lm.load(str(converted[case] / "aux"))
    assert max_diff(base(prompt), ref["base_logits"]) <= TOL
    assert max_diff(aux(prompt[:, :-1]), ref["aux_logits"]) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_kv_prediction_matches_corenet(converted, case):
    ref = reference(case)
    model = kvp_mlx.load(converted[case])
    result = model.prefill(mx.array(ref["prompt"]), method="kvp")
    assert max_diff(result.logits, ref["first_logits"]) <= TOL
    np.testing.assert_array_equal(greedy(model, result), ref["greedy"])


@pytest.mark.parametrize("case", CASES)
def test_converted_base_generates_with_mlx_lm(converted, case):
    model, tok = mlx_lm.load(str(converted[case] / "base"))
    assert tok.encode("the fox")[0] == tok.bos_token_id
    text = mlx_lm.generate(model, tok, prompt="the quick brown fox", max_tokens=6)
    assert isinstance(text, str)


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-2), ("bfloat16", 1e-1)])
def test_half_precision_checkpoints(tmp_path, tokenizers, dtype, tol):
    case = "pub_kvpc_gpt_test"
    ref = reference(case)
    ckpt = rewrite_checkpoint(case, tmp_path / f"{case}_{dtype}.pt", dtype)
    out = convert_checkpoint(ckpt, FIXTURES / f"{case}.yaml", tmp_path / "out", tokenizer=tokenizers[case])
    weights = mx.load(str(out / "base" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {getattr(mx, dtype)}  # the checkpoint's dtype is kept
    base, _ = mlx_lm.load(str(out / "base"))
    assert max_diff(base(mx.array(ref["prompt"])), ref["base_logits"]) <= tol
    model = kvp_mlx.load(out)  # the runtime computes in float32 on the CPU
    assert max_diff(model.prefill(mx.array(ref["prompt"])).logits, ref["first_logits"]) <= tol
    # an explicit --dtype float32 upcasts exactly
    out32 = convert_checkpoint(ckpt, FIXTURES / f"{case}.yaml", tmp_path / "out32", dtype="float32")
    w32 = mx.load(str(out32 / "base" / "model.safetensors"))
    for name, w in weights.items():
        assert w32[name].dtype == mx.float32 and mx.array_equal(w32[name], w.astype(mx.float32))


def test_quantized_output_loads_and_generates(tmp_path, tokenizers, capsys):
    case = "pub_kvpc_elm"
    ref = reference(case)
    out = tmp_path / "q4"
    q_args = ("-q", "--q-bits", "4", "--q-group-size", "32")
    assert main(cli_args(case, tmp_path, out, "--tokenizer", str(tokenizers[case]), *q_args)) == 0
    assert "quantized" in capsys.readouterr().err
    cfg = json.loads((out / "base" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    weights = mx.load(str(out / "base" / "model.safetensors"))
    assert "transformer.layers.0.attn.qkv_proj.scales" in weights
    assert all(w.dtype == mx.float32 for w in mx.load(str(out / "predictor.safetensors")).values())
    model, tok = mlx_lm.load(str(out / "base"))
    assert isinstance(mlx_lm.generate(model, tok, prompt="the lazy dog", max_tokens=4), str)
    result = kvp_mlx.load(out).prefill(mx.array(ref["prompt"]))
    diff = max_diff(result.logits, ref["first_logits"])
    print(f"q4 first-token logits max abs diff from float: {diff:.4f}")
    assert np.isfinite(diff)

    # group size 64 does not divide model_dim 96: those layers stay float, and the CLI says so
    assert main(cli_args(case, tmp_path, tmp_path / "q64", "-q", "--q-group-size", "64")) == 0
    assert "left in float" in capsys.readouterr().err
    assert mlx_lm.load is not None and (tmp_path / "q64" / "aux" / "config.json").is_file()


def test_single_model_training_checkpoint(tmp_path, tokenizers):
    """A general_gpt checkpoint saved as a DDP training checkpoint becomes one mlx-lm directory."""
    ref = reference("pub_kvpc_gpt_test")
    arrays = fixture_arrays("pub_kvpc_gpt_test")
    state = OrderedDict(
        (f"module.{k[len('base.'):]}", tensor(a)) for k, a in arrays.items() if k.startswith("base.")
    )
    ckpt = write_torch_zip(tmp_path / "train.pt", {"epoch": 2, "model_state_dict": state, "best_metric": 0.5})
    yaml_path = single_model_yaml(tmp_path / "single.yaml", "gpt-test-base", 64)
    out = convert_checkpoint(ckpt, yaml_path, tmp_path / "single", tokenizer=tokenizers["pub_kvpc_gpt_test"])
    assert not (out / "kvp_config.json").exists() and (out / "config.json").is_file()
    model, _ = mlx_lm.load(str(out))
    assert max_diff(model(mx.array(ref["prompt"])), ref["base_logits"]) <= TOL


def test_untied_embeddings_without_qk_norm_and_padded_vocab(tmp_path):
    cfg = dict(
        num_transformer_layers=2, model_dim=32, head_dim=8, num_query_heads=[2, 4], num_kv_heads=[1, 2],
        ffn_multipliers=[1.0, 2.0], ffn_dim_divisor=32, normalize_qk_projections=False,
        share_input_output_layers=False,
    )
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    shapes = {"token_embeddings.weight": (40, 32), "norm.weight": (32,), "classifier.weight": (40, 32)}
    for i, (q, kv, ffn) in enumerate([(2, 1, 32), (4, 2, 64)]):
        shapes |= {
            f"layers.{i}.attn.qkv_proj.weight": ((q + 2 * kv) * 8, 32), f"layers.{i}.attn.out_proj.weight": (32, q * 8),
            f"layers.{i}.ffn.proj_1.weight": (2 * ffn, 32), f"layers.{i}.ffn.proj_2.weight": (32, ffn),
            f"layers.{i}.attn_norm.weight": (32,), f"layers.{i}.ffn_norm.weight": (32,),
        }
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    ckpt = write_torch_zip(tmp_path / "m.pt", OrderedDict((k, tensor(a)) for k, a in arrays.items()))
    # the YAML's vocab_size may differ from the (padded) embedding: the tensor's row count wins
    yaml_path = single_model_yaml(tmp_path / "m.yaml", "my-model", 32, "general_gpt")
    out = convert_checkpoint(ckpt, yaml_path, tmp_path / "out", model_config=tmp_path / "cfg.json")
    weights = mx.load(str(out / "model.safetensors"))
    np.testing.assert_array_equal(np.array(weights["lm_head.weight"]), arrays["classifier.weight"])
    assert not any("q_norm" in k for k in weights)
    config = json.loads((out / "config.json").read_text())
    model, _ = mlx_lm.utils.load_model(out)
    assert config["vocab_size"] == 40 and not config["share_input_output_layers"]
    assert "max_context_length" not in config  # neither the YAML nor cfg.json gives one
    assert model(mx.array([[1, 2, 39]])).shape == (1, 3, 40)


# ---- bad input: a clear one-line error, exit status 1, and nothing left behind ---------------------


def fails(capsys, args: list[str], message: str, out: Path) -> None:
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not out.exists() and no_leftovers(out.parent)


def test_truncated_checkpoint(tmp_path, capsys):
    data = (FIXTURES / "pub_kvpc_elm.pt").read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    fails(capsys, cli_args("pub_kvpc_elm", tmp_path, out, checkpoint=half), "corrupt or truncated checkpoint", out)


def test_corrupt_storage_fails_mid_write_and_cleans_up(tmp_path, capsys):
    case = "pub_kvpc_gpt_test"
    raw = bytearray((FIXTURES / f"{case}.pt").read_bytes())
    raw[-20000] ^= 0xFF  # inside a late storage: found by the zip CRC while writing
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    out = tmp_path / "out"
    fails(capsys, cli_args(case, tmp_path, out, checkpoint=bad), "corrupt or truncated checkpoint", out)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("base.layers.1.ffn.proj_2.weight"),
         "missing keys in checkpoint: base.layers.1.ffn.proj_2.weight"),
        (lambda d: d.pop("predicter.auxkv_to_basekv.value_transforms.2.bias"),
         "missing keys in checkpoint: predicter.auxkv_to_basekv.value_transforms.2.bias"),
        (lambda d: d.update({"auxiliary.extra.weight": np.zeros(3, np.float32)}),
         "unexpected keys in checkpoint: auxiliary.extra.weight"),
        (lambda d: d.update({"base.norm.weight": np.zeros(7, np.float32)}),
         "shape mismatch for base.norm.weight: expected (128,), found (7,)"),
    ],
)
def test_missing_unexpected_and_misshapen_tensors(tmp_path, capsys, edit, message):
    ckpt = rewrite_checkpoint("pub_kvpc_gpt_test", tmp_path / "edited.pt", edit=edit)
    out = tmp_path / "out"
    fails(capsys, cli_args("pub_kvpc_gpt_test", tmp_path, out, checkpoint=ckpt), message, out)


def _set_mapping(mapping):
    def edit(cfg):
        cfg["model"]["language_modeling"]["kv_prediction"]["auxkv_num_layers_to_basekv_num_layers"] = mapping
    return edit


@pytest.mark.parametrize(
    "mapping, message",
    [
        ([0, 1], "layer mapping has 2 entries but the base model has 3 layers"),
        ([0, 1, 5], "layer mapping entry 2 is 5, out of range for an auxiliary model with 2 layers"),
        ([0, 0, 1], "shape mismatch for predicter.auxkv_to_basekv.key_transforms.1.weight"),
    ],
)
def test_bad_layer_mapping(tmp_path, capsys, mapping, message):
    yaml_path = edit_yaml("pub_kvpc_gpt_test", tmp_path / "m.yaml", _set_mapping(mapping))
    out = tmp_path / "out"
    args = ["--checkpoint", str(FIXTURES / "pub_kvpc_gpt_test.pt"), "--config", str(yaml_path), "--out", str(out)]
    fails(capsys, args, message, out)


def test_unknown_model_name_and_malicious_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--checkpoint", str(FIXTURES / "pub_kvpc_elm.pt"), "--config", str(FIXTURES / "pub_kvpc_elm.yaml"),
            "--out", str(out)]
    fails(capsys, args, "unknown model name 'pub-elm-base' for the base model; known names: gpt-test,", out)

    import pickle

    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = write_torch_zip(tmp_path / "evil.pt", {}, pickle_bytes=pickle.dumps(OrderedDict(w=Evil()), protocol=2))
    fails(capsys, cli_args("pub_kvpc_gpt_test", tmp_path, out, checkpoint=evil), "refusing to load it", out)
    assert not marker.exists()


def test_existing_output_needs_force_and_is_replaced_only_on_success(tmp_path, capsys):
    case = "pub_kvpc_gpt_test"
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(cli_args(case, tmp_path, out)) == 1
    assert "already exists (pass --force" in capsys.readouterr().err and (out / "old.txt").exists()

    half = tmp_path / "half.pt"
    half.write_bytes((FIXTURES / f"{case}.pt").read_bytes()[:100000])
    assert main(cli_args(case, tmp_path, out, "--force", checkpoint=half)) == 1
    assert (out / "old.txt").exists() and no_leftovers(tmp_path)  # a failed --force leaves the old one

    assert main(cli_args(case, tmp_path, out, "--force")) == 0
    assert not (out / "old.txt").exists() and (out / "kvp_config.json").is_file() and no_leftovers(tmp_path)


def test_option_errors(tmp_path, capsys, tokenizers):
    out = tmp_path / "out"
    fails(capsys, cli_args("pub_kvpc_gpt_test", tmp_path, out, "--q-bits", "8"), "need -q", out)
    fails(capsys, cli_args("pub_kvpc_gpt_test", tmp_path, out, "--tokenizer", str(tokenizers["pub_kvpc_elm"])),
          "has 128 pieces, more than the model's vocabulary of 64", out)
    fails(capsys, cli_args("pub_kvpc_gpt_test", tmp_path, out, "--model-config", str(tmp_path / "x.json")),
          "--model-config is for single-model checkpoints", out)


def test_convert_as_a_subcommand(tmp_path, capsys):
    """The add_arguments / run contract kvp_mlx/cli.py uses for its subcommands."""

    import kvp_mlx.cli

    parse = kvp_mlx.cli.build_parser("convert").parse_args
    out = tmp_path / "sub" / "out"
    args = parse(["convert", *cli_args("pub_kvpc_gpt_test", tmp_path, out)])
    assert args._run(args) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "kvp_config.json").is_file() and out.stat().st_mode & 0o777 == 0o777 & ~umask
    args = parse(["convert", *cli_args("pub_kvpc_gpt_test", tmp_path, out)])
    assert args._run(args) == 1
    assert "already exists" in capsys.readouterr().err


def test_progress_bar_on_large_checkpoints(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_PROGRESS_MIN_BYTES", 0)
    assert main(cli_args("pub_kvpc_gpt_test", tmp_path, tmp_path / "out")) == 0
    assert "converting" in capsys.readouterr().err


def test_tokenizer_must_cover_the_vocabulary_and_a_missing_one_is_noted(tmp_path, capsys):
    case = "pub_kvpc_gpt_test"  # vocabulary of 64
    out = tmp_path / "out"
    (tmp_path / "sp48").mkdir()
    small = fixture_tokenizer(tmp_path / "sp48", 48)
    fails(capsys, cli_args(case, tmp_path, out, "--tokenizer", str(small)),
          "has 48 pieces but the model's vocabulary has 64 entries", out)
    assert main(cli_args(case, tmp_path, out)) == 0
    note = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert len(note) == 1 and "no tokenizer" in note[0] and "tokenizer.json" in note[0], note
    assert f"{out}/base" in note[0] and "--tokenizer" in note[0]
    with pytest.raises(KVPError, match="has no tokenizer"):
        load(out)
