"""Build models and model directories from configs: random-weight mlx-lm models of a given shape,
layer-pruned copies (KVP-LP), predictors, and KV Prediction directories around them.

Used by the trainer (layer-pruned auxiliaries, predictors), the toy world and the benchmark (real
OpenELM shapes with random weights: timing needs no trained weights and no download).
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, save_config, save_model

from kvp_mlx.adapters import kv_shapes, sliding_window_layers
from kvp_mlx.model import write_kvp_config
from kvp_mlx.predictor import KVPredictor, PredictorConfig, default_layer_mapping

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def num_layers(config: dict) -> int:
    return int(config.get("num_transformer_layers") or config["num_hidden_layers"])


def build_model(config: dict, seed: int | None = None) -> nn.Module:
    """An mlx-lm model of ``config``'s architecture with random weights (evaluated).

    The model class is the one mlx-lm's loader picks for the config (its model-type remapping
    included: ``mistral`` runs as mlx-lm's ``llama``).
    """
    if seed is not None:
        mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def layer_pruned(model: nn.Module, config: dict, keep: Sequence[int]) -> tuple[nn.Module, dict]:
    """A copy of ``model`` keeping only layers ``keep`` (in order), with its config (KVP-LP)."""
    n = num_layers(config)
    if not keep or any(not 0 <= i < n for i in keep) or list(keep) != sorted(set(keep)):
        raise ValueError(f"layers to keep must be increasing indices in [0, {n}), got {list(keep)}")
    cfg = copy.deepcopy(config)
    if "num_transformer_layers" in cfg:
        cfg["num_transformer_layers"] = len(keep)
        for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            cfg[key] = [config[key][i] for i in keep]
    else:
        cfg["num_hidden_layers"] = len(keep)
    new_index = {old: new for new, old in enumerate(keep)}
    weights: list = []
    for name, value in tree_flatten(model.parameters()):  # type: ignore[str-unpack]  # a list (typed list | dict)
        m = re.search(r"(^|\.)layers\.(\d+)\.", name)
        if m is None:
            weights.append((name, value))
        elif int(m.group(2)) in new_index:
            new = f"{m.group(1)}layers.{new_index[int(m.group(2))]}."
            weights.append((name[: m.start()] + new + name[m.end() :], value))
    pruned = build_model(cfg)
    sliding = set(sliding_window_layers(model))
    kinds = [i in sliding for i in keep]
    if kinds != [i in set(sliding_window_layers(pruned)) for i in range(len(keep))]:
        raise ValueError(
            f"keeping layers {list(keep)} changes which layers use a sliding window "
            f"(the config's layer pattern cannot express {['sliding' if k else 'global' for k in kinds]})"
        )
    if "quantization" in cfg:  # a quantized base (e.g. an mlx-community 4-bit model): same modules quantized
        q, names = cfg["quantization"], {name for name, _ in weights}
        nn.quantize(pruned, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in names)
    pruned.load_weights(weights)
    return pruned, cfg


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
