"""Random-weight mlx-lm models of a config, and layer-pruned copies of a model (KVP-LP).

The loader builds a layer-pruned auxiliary at load time (``"aux": {"base_layers": [...]}``); the
trainer and the test helpers build them too (:mod:`kvp_mlx.building`).
"""

from __future__ import annotations

import copy
import re
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from kvp_mlx.adapters import sliding_window_layers
from kvp_mlx.architectures import ARCHITECTURES, Architecture
from kvp_mlx.mlx_lm_private import model_classes


def _entry(config: dict) -> Architecture | None:
    return ARCHITECTURES.get(config.get("model_type", ""))


def num_layers(config: dict) -> int:
    arch = _entry(config)
    key = arch.layers_key if arch else "num_hidden_layers"
    return int(config.get(key) or config.get("num_transformer_layers") or config["num_hidden_layers"])


def _rope_layers(model: nn.Module) -> list[bool]:
    """Per layer: does it apply RoPE (its registry entry says)."""
    from kvp_mlx.adapters import arch_of, attention_modules

    arch = arch_of(model)
    return [bool(arch.applies_rope(a)) for a in attention_modules(model)]


def build_model(config: dict, seed: int | None = None) -> nn.Module:
    """An mlx-lm model of ``config``'s architecture with random weights (evaluated).

    The model class is the one mlx-lm's loader picks for the config (its model-type remapping
    included: ``mistral`` runs as mlx-lm's ``llama``).
    """
    if seed is not None:
        mx.random.seed(seed)
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def layer_pruned(model: nn.Module, config: dict, keep: Sequence[int]) -> tuple[nn.Module, dict]:
    """A copy of ``model`` keeping only layers ``keep`` (in order), with its config (KVP-LP)."""
    n = num_layers(config)
    if not keep or any(not 0 <= i < n for i in keep) or list(keep) != sorted(set(keep)):
        raise ValueError(f"layers to keep must be increasing indices in [0, {n}), got {list(keep)}")
    cfg, arch = copy.deepcopy(config), _entry(config)
    cfg[arch.layers_key if arch else "num_hidden_layers"] = len(keep)
    for key in arch.per_layer_keys if arch else ():  # config lists of one entry per layer
        if isinstance(config.get(key), list):
            cfg[key] = [config[key][i] for i in keep]
    new_index = {old: new for new, old in enumerate(keep)}
    # where the blocks' parameters live ("model.layers", gpt2's "model.h"): the path of model.layers[0]
    first = model.layers[0]
    prefix = next(name for name, m in model.named_modules() if m is first).rsplit(".", 1)[0]
    block = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    weights: list = []
    for name, value in tree_flatten(model.parameters()):  # type: ignore[str-unpack]  # a list (typed list | dict)
        m = block.match(name)
        if m is None:
            weights.append((name, value))
        elif int(m.group(1)) in new_index:
            weights.append((f"{prefix}.{new_index[int(m.group(1))]}.{name[m.end():]}", value))
    pruned = build_model(cfg)
    sliding = set(sliding_window_layers(model))
    kinds = [i in sliding for i in keep]
    if kinds != [i in set(sliding_window_layers(pruned)) for i in range(len(keep))]:
        raise ValueError(
            f"keeping layers {list(keep)} changes which layers use a sliding window "
            f"(the config's layer pattern cannot express {['sliding' if k else 'global' for k in kinds]})"
        )
    rope = [_rope_layers(model)[i] for i in keep]
    if rope != _rope_layers(pruned):
        raise ValueError(
            f"keeping layers {list(keep)} changes which layers apply RoPE "
            f"(the config's layer pattern cannot express {['rope' if r else 'nope' for r in rope]})"
        )
    if "quantization" in cfg:  # a quantized base (e.g. an mlx-community 4-bit model): same modules quantized
        q, names = cfg["quantization"], {name for name, _ in weights}
        nn.quantize(pruned, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in names)
    pruned.load_weights(weights)
    return pruned, cfg
