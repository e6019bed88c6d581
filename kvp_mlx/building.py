"""Build models and model directories from configs: random-weight mlx-lm models of a given shape,
layer-pruned copies (KVP-LP), predictors, and KV Prediction directories around them.

Used by the trainer (layer-pruned auxiliaries, predictors), the toy world and the benchmark (real
OpenELM shapes with random weights: timing needs no trained weights and no download).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import save_config, save_model

from kvp_mlx.adapters import kv_shapes
from kvp_mlx.layer_pruning import build_model, layer_pruned, num_layers  # noqa: F401  (public here too)
from kvp_mlx.model import write_kvp_config
from kvp_mlx.predictor import KVPredictor, PredictorConfig, default_layer_mapping

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def save_lm_dir(directory: str | Path, model: nn.Module, config: dict, tokenizer_dir: str | Path) -> Path:
    """An ordinary mlx-lm model directory: config.json, model.safetensors, tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(directory, model)
    save_config(dict(config), directory / "config.json")
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy(src, directory / name)
    return directory


def make_predictor(
    base: nn.Module, aux: nn.Module, mapping: Sequence[int] | None = None, init: str = "random",
    seed: int | None = None,
) -> KVPredictor:
    """A predictor connecting ``aux`` to ``base``: ``init`` is "random" or "identity"."""
    base_kv, aux_kv = kv_shapes(base), kv_shapes(aux)
    mapping = list(mapping) if mapping is not None else default_layer_mapping(len(base_kv), len(aux_kv))
    if seed is not None:
        mx.random.seed(seed)
    predictor = KVPredictor(PredictorConfig(mapping, base_kv, aux_kv))
    if init == "identity":
        predictor.set_identity()
    elif init != "random":
        raise ValueError(f"unknown predictor init '{init}'")
    mx.eval(predictor.parameters())
    return predictor


def save_kvp_dir(
    directory: str | Path,
    base: nn.Module, base_config: dict,
    aux: nn.Module, aux_config: dict,
    predictor: KVPredictor,
    tokenizer_dir: str | Path,
    source: str,
    random_weights: bool = False,
) -> Path:
    """Write a complete KV Prediction directory (see kvp_mlx.model)."""
    directory = Path(directory)
    save_lm_dir(directory / "base", base, base_config, tokenizer_dir)
    save_lm_dir(directory / "aux", aux, aux_config, tokenizer_dir)
    predictor.save(directory)
    write_kvp_config(directory, source=source, random_weights=random_weights)
    return directory
