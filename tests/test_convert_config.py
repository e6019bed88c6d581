"""corenet YAML and named configs -> per-layer OpenELM configs, checked against published values."""

from __future__ import annotations

import json

import pytest

from convert_helpers import FIXTURES, CASES, edit_yaml, single_model_yaml, write_model_configs
from kvp_mlx.convert.corenet_config import (
    config_from_json,
    known_model_names,
    make_divisible,
    named_config,
    read_training_yaml,
    resolve_config,
)
from kvp_mlx.errors import KVPError

# Per-layer sizes of Apple's released OpenELM models (their Hugging Face config.json files).
PUBLISHED = {
    "OpenELM-270M": dict(
        q=[12] * 5 + [16] * 7 + [20] * 4,
        kv=[3] * 5 + [4] * 7 + [5] * 4,
        ffn=[0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37, 2.6, 2.83, 3.07, 3.3, 3.53, 3.77, 4.0],
    ),
    "OpenELM-450M": dict(q=[12] * 3 + [16] * 7 + [20] * 6 + [24] * 4, kv=[3] * 3 + [4] * 7 + [5] * 6 + [6] * 4),
    "OpenELM-1_1B": dict(
        q=[16] * 3 + [20] * 7 + [24] * 8 + [28] * 6 + [32] * 4,
        kv=[4] * 3 + [5] * 7 + [6] * 8 + [7] * 6 + [8] * 4,
        ffn_dims=[1024, 1280, 1536, 1792, 2048, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096, 4608,
                  4608, 5120, 5376, 5632, 5888, 6144, 6400, 6656, 6912, 7168, 7424, 7680, 7936, 8192],
    ),
    "OpenELM-3B": dict(
        q=[12] * 4 + [16] * 14 + [20] * 12 + [24] * 6,
        kv=[3] * 4 + [4] * 14 + [5] * 12 + [6] * 6,
        ffn_dims=[1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 4096, 4352, 4608, 4864, 5120, 5632,
                  5888, 6144, 6400, 6656, 7168, 7424, 7680, 7936, 8192, 8704, 8960, 9216, 9472, 9728,
                  10240, 10496, 10752, 11008, 11264, 11776, 12032, 12288],
    ),
}


def test_make_divisible_matches_corenet():
    assert make_divisible(32, 64) == 64  # never below the divisor
    assert make_divisible(48.64, 64) == 64
    assert make_divisible(64, 48) == 96  # rounding down to 48 would lose more than 10%
    assert make_divisible(160.32, 256) == 256
    assert make_divisible(0.63 * 2048, 256) == 1280


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_openelm_tables_reproduce_published_configs(name):
    cfg = named_config(name, 32000)
    want = PUBLISHED[name]
    assert cfg.num_query_heads == want["q"]
    assert cfg.num_kv_heads == want["kv"]
    if "ffn" in want:
        assert cfg.ffn_multipliers == want["ffn"]
    if "ffn_dims" in want:
        assert cfg.ffn_dims() == want["ffn_dims"]
    assert cfg.normalize_qk_projections and cfg.share_input_output_layers


def test_layer_pruned_variants_select_full_depth_layers():
    full = named_config("OpenELM-1_1B", 32000)
    for name, keep in (
        ("OpenELM-1_1B-0.25l", [0, 4, 8, 12, 16, 20, 24]),
        ("OpenELM-1_1B-0.75l", [i for i in range(28) if i % 4 != 3]),
    ):
        cfg = named_config(name, 32000)
        assert cfg.num_transformer_layers == len(keep)
        assert cfg.num_query_heads == [full.num_query_heads[i] for i in keep]
        assert cfg.ffn_multipliers == [full.ffn_multipliers[i] for i in keep]
    half = named_config("OpenELM-1_1B-0.50l", 32000)
    assert half.num_transformer_layers == 14
    assert half.ffn_multipliers[0] == 0.5 and half.ffn_multipliers[-1] == round(4.0 - 3.5 / 27, 2)
    three = named_config("OpenELM-3B-0.25l", 32000)
    assert three.num_transformer_layers == 9 and three.head_dim == 128


def test_every_named_config_is_consistent():
    for name in known_model_names():
        cfg = named_config(name, 100)
        n = cfg.num_transformer_layers
        assert len(cfg.num_query_heads) == len(cfg.num_kv_heads) == len(cfg.ffn_multipliers) == n
        assert all(q % kv == 0 for q, kv in zip(cfg.num_query_heads, cfg.num_kv_heads))
        assert cfg.to_mlx_config()["model_type"] == "openelm"
    with pytest.raises(KVPError, match="unknown model name 'OpenELM-7B'.*OpenELM-270M"):
        named_config("OpenELM-7B", 100)


@pytest.mark.parametrize("case", CASES)
def test_fixture_arch_json_and_tables_agree(tmp_path, case):
    arch = json.loads((FIXTURES / f"{case}.arch.json").read_text())
    train = read_training_yaml(FIXTURES / f"{case}.yaml")
    assert train.kind == "kv_prediction" and train.mapping == arch["mapping"]
    paths = write_model_configs(case, tmp_path)
    for role in ("base", "aux"):
        cfg = config_from_json(paths[role])
        assert cfg.num_query_heads == arch[role]["num_query_heads"]
        assert train.models[role].model_name == arch[role]["model_name"]
        if arch[role]["model_name"] in known_model_names():  # gpt-test-base / gpt-test-aux
            table = named_config(arch[role]["model_name"], arch[role]["vocab_size"])
            assert table == cfg


def test_yaml_errors_and_single_models(tmp_path):
    single = read_training_yaml(single_model_yaml(tmp_path / "s.yaml", "OpenELM-270M", 32128, "general_gpt"))
    assert single.kind == "single" and single.models["model"].vocab_size == 32128
    cfg = resolve_config(single.models["model"], "single", None, "--model-config")
    assert cfg.vocab_size == 32128 and cfg.num_transformer_layers == 16

    train = read_training_yaml(FIXTURES / "pub_kvpc_elm.yaml")
    with pytest.raises(KVPError, match="unknown model name 'pub-elm-base'.*--base-config"):
        resolve_config(train.models["base"], "base", None, "--base-config")

    def other_type(cfg):
        base = cfg["model"]["language_modeling"]["kv_prediction"]["base_model"][0]
        base["model"]["language_modeling"]["name"] = "vit"

    with pytest.raises(KVPError, match="model type 'vit' is not supported"):
        read_training_yaml(edit_yaml("pub_kvpc_elm", tmp_path / "t.yaml", other_type))
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(KVPError, match="not valid YAML"):
        read_training_yaml(tmp_path / "bad.yaml")
    (tmp_path / "c.json").write_text(json.dumps({"num_transformer_layers": 2, "model_dim": 8}))
    with pytest.raises(KVPError, match="missing head_dim"):
        config_from_json(tmp_path / "c.json")
