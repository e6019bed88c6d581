"""Shared fixtures: a tokenizer and tiny random models of every supported architecture."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvp_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten

from kvp_mlx import testing as mb

ARCHS = ["openelm", "llama", "mistral", "qwen2", "qwen3", "gemma3"]
# Architectures token pruning (lazy, rp) refuses, with the text its error names.
NOT_LAYERWISE = {"gemma3": "gemma3_text"}
VOCAB = 512


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: the longer cases (half precision on the CPU); CI runs them, -m 'not slow' skips them"
    )


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return mb.build_byte_tokenizer(tmp_path_factory.mktemp("tok"), mb.default_tokenizer_texts(), VOCAB)


def copy_of(model, config):
    twin = mb.build_model(config)
    twin.load_weights(tree_flatten(model.parameters()))
    mx.eval(twin.parameters())
    return twin


@pytest.fixture(scope="session")
def identity_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Per architecture: aux = a copy of the base, identity mapping, identity predictor."""
    root = tmp_path_factory.mktemp("identity")
    dirs = {}
    for i, arch in enumerate(ARCHS):
        cfg = mb.tiny_config(arch, n_layers=3, vocab_size=VOCAB)
        base = mb.build_model(cfg, seed=i)
        aux = copy_of(base, cfg)
        pred = mb.make_predictor(base, aux, mapping=[0, 1, 2], init="identity")
        dirs[arch] = mb.save_kvp_dir(root / arch, base, cfg, aux, cfg, pred, tokenizer_dir, "test identity", True)
    return dirs


@pytest.fixture(scope="session")
def random_pair_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """An openelm base (3 layers) with a smaller 2-layer auxiliary and a random predictor."""
    root = tmp_path_factory.mktemp("pair")
    base_cfg = mb.tiny_config("openelm", n_layers=3, vocab_size=VOCAB)
    aux_cfg = mb.tiny_config("openelm", n_layers=2, vocab_size=VOCAB)
    aux_cfg.update(model_dim=48, num_query_heads=[3, 3], num_kv_heads=[1, 1])
    base, aux = mb.build_model(base_cfg, seed=1), mb.build_model(aux_cfg, seed=2)
    pred = mb.make_predictor(base, aux, init="random", seed=3)
    return mb.save_kvp_dir(root / "pair", base, base_cfg, aux, aux_cfg, pred, tokenizer_dir, "test pair", True)


@pytest.fixture(scope="session")
def train_pair(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A 4-layer openelm base and a smaller 2-layer auxiliary as mlx-lm directories, and text data
    (this package's sources), for trainer tests; each test writes its outputs under ``root``."""
    root = tmp_path_factory.mktemp("train")
    base_cfg = mb.tiny_config("openelm", 4, VOCAB)
    aux_cfg = mb.tiny_config("openelm", 2, VOCAB)
    aux_cfg.update(model_dim=32, num_query_heads=[2, 2], num_kv_heads=[1, 1])
    mb.save_lm_dir(root / "base", mb.build_model(base_cfg, 0), base_cfg, tokenizer_dir)
    mb.save_lm_dir(root / "aux", mb.build_model(aux_cfg, 1), aux_cfg, tokenizer_dir)
    data = root / "data"
    data.mkdir()
    for p in sorted(Path(mb.__file__).parent.glob("*.py")):
        (data / p.name).write_text(p.read_text())
    return {"root": root, "base": root / "base", "aux": root / "aux", "data": data}


def post_completion(server, body: dict) -> tuple[int, dict]:
    """POST ``body`` to a test server's /v1/completions: (HTTP status, the JSON answer)."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()
