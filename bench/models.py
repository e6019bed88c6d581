"""Models for the benchmark: the paper's OpenELM pairs with random weights, built in memory, or
model directories loaded from disk.

A :class:`BenchGroup` is one base model with the auxiliary models (and predictors) that can fill
its cache: all pairs sharing a base share one base model, so every method of a group runs against
the same weights in the same process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.convert.corenet_config import LAYER_PRUNED_CONFIGS, named_config
from kvp_mlx.errors import KVPError
from kvp_mlx.model import KVPModel, load
from kvp_mlx.building import build_model, layer_pruned, make_predictor

VOCAB_SIZE = 32000  # LLaMA-2's SentencePiece vocabulary

def openelm_config(name: str) -> dict:
    """mlx-lm config of a corenet-named OpenELM (exact per-layer shapes, 32000-token vocabulary)."""
    return named_config(name, VOCAB_SIZE).to_mlx_config()


# The paper's KV Prediction pairs (base, auxiliary): KVP-C (a smaller OpenELM) and KVP-LP (layer-pruned base).
PAIRS: dict[str, tuple[str, str]] = {
    "kvp-c-270m": ("OpenELM-1_1B", "OpenELM-270M"),
    "kvp-c-450m": ("OpenELM-1_1B", "OpenELM-450M"),
    "kvp-lp-0.50": ("OpenELM-1_1B", "OpenELM-1_1B-0.50l"),
    "kvp-lp-0.25": ("OpenELM-1_1B", "OpenELM-1_1B-0.25l"),
    "3b-kvp-c-1.1b": ("OpenELM-3B", "OpenELM-1_1B"),
}


@dataclass
class BenchGroup:
    """One base model and, per auxiliary model, a KVPModel joining them (empty for base-only)."""

    name: str
    base_only: KVPModel  # the base with no auxiliary: for methods that use the base alone
    variants: dict[str, KVPModel] = field(default_factory=dict)  # auxiliary name -> model
    source: str = ""  # "random weights (in memory)" or the directory loaded

    @property
    def base(self) -> nn.Module:
        return self.base_only.base

    @property
    def vocab_size(self) -> int:
        return int(self.base.args.vocab_size)


def _cast(module: nn.Module, dtype: mx.Dtype) -> nn.Module:
    module.set_dtype(dtype)
    mx.eval(module.parameters())
    return module


def build_pairs(pair_names: list[str], dtype: mx.Dtype = mx.float32, seed: int = 0) -> list[BenchGroup]:
    """Random-weight OpenELM pairs (names from :data:`PAIRS`), grouped by base model."""
    unknown = [p for p in pair_names if p not in PAIRS]
    if unknown:
        raise KVPError(f"unknown model pair(s) {', '.join(unknown)} (known: {', '.join(PAIRS)})")
    groups: dict[str, BenchGroup] = {}
    for n, pair in enumerate(pair_names):
        base_name, aux_name = PAIRS[pair]
        if base_name not in groups:
            base_cfg = openelm_config(base_name)
            base = _cast(build_model(base_cfg, seed=seed), dtype)
            base_only = KVPModel(base=base, tokenizer=None, config={"random_weights": True}, dtype=dtype)
            groups[base_name] = BenchGroup(base_name, base_only, source="random weights (in memory)")
        group = groups[base_name]
        base = group.base
        keep = getattr(LAYER_PRUNED_CONFIGS.get(aux_name), "select_layers", None)
        if keep is not None:
            # KVP-LP 0.25: the auxiliary is the base's own layers 0, 4, 8, ... (weights shared)
            aux, _ = layer_pruned(base, openelm_config(base_name), keep)
        else:
            aux = build_model(openelm_config(aux_name), seed=seed + 1 + n)
        aux = _cast(aux, dtype)
        predictor = make_predictor(base, aux, init="random", seed=seed + 100 + n)
        _cast(predictor, dtype)
        group.variants[aux_name] = KVPModel(
            base=base, tokenizer=None, aux=aux, predictor=predictor,
            config={"random_weights": True}, dtype=dtype,
        )
    return list(groups.values())


def load_group(path: str | Path, dtype: str | None = None) -> BenchGroup:
    """A model directory (KV Prediction or plain mlx-lm) or Hugging Face repo id as a group."""
    model = load(path, dtype=dtype)
    base_only = KVPModel(base=model.base, tokenizer=model.tokenizer, path=model.path,
                         config=model.config, dtype=model.dtype)
    name = Path(str(path)).name or str(path)
    group = BenchGroup(name, base_only, source=str(model.path))
    if model.aux is not None:
        group.variants["aux"] = model
    return group
