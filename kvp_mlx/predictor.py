"""The KV predictor: per base layer, linear maps from an auxiliary layer's raw K/V to the base's.

For base layer i, ``mapping[i]`` names the auxiliary layer whose cache feeds it. Keys and values
each get one ``Linear(aux_kv_dim -> base_kv_dim)`` with bias, applied on merged heads
(``[B, L, heads * head_dim]``) and split back into the base layer's heads, as in corenet.

Stored in a model directory as ``predictor.safetensors`` (``key_transforms.{i}.weight`` /
``.bias``, ``value_transforms.{i}.weight`` / ``.bias``) plus ``predictor.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from kvp_mlx.errors import KVPError

PREDICTOR_CONFIG = "predictor.json"
PREDICTOR_WEIGHTS = "predictor.safetensors"


@dataclass(frozen=True)
class KVShape:
    """A layer's cache shape: number of KV heads and head dimension."""

    heads: int
    head_dim: int

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


@dataclass
class PredictorConfig:
    mapping: list[int]
    base_kv: list[KVShape]
    aux_kv: list[KVShape]

    def validate(self) -> None:
        n_base, n_aux = len(self.base_kv), len(self.aux_kv)
        if len(self.mapping) != n_base:
            raise KVPError(
                f"layer mapping has {len(self.mapping)} entries but the base model has {n_base} layers"
            )
        bad = [(i, j) for i, j in enumerate(self.mapping) if not 0 <= j < n_aux]
        if bad:
            i, j = bad[0]
            raise KVPError(
                f"layer mapping entry {i} is {j}, out of range for an auxiliary model with {n_aux} layers"
            )

    def to_json(self) -> dict:
        return {
            "mapping": list(self.mapping),
            "base_kv": [asdict(s) for s in self.base_kv],
            "aux_kv": [asdict(s) for s in self.aux_kv],
        }

    @classmethod
    def from_json(cls, d: dict) -> "PredictorConfig":
        try:
            return cls(
                mapping=[int(j) for j in d["mapping"]],
                base_kv=[KVShape(int(s["heads"]), int(s["head_dim"])) for s in d["base_kv"]],
                aux_kv=[KVShape(int(s["heads"]), int(s["head_dim"])) for s in d["aux_kv"]],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise KVPError(f"malformed {PREDICTOR_CONFIG}: {e!r}") from None


def default_layer_mapping(n_base: int, n_aux: int) -> list[int]:
    """The paper's rule: neighbouring base layers share an auxiliary layer, as evenly as rounding allows.

    The first ``n_base % n_aux`` auxiliary layers feed one base layer more than the rest, which
    reproduces the released configs (28 <- 16: 0,0,1,1,...,11,11,12,13,14,15; 28 <- 7: each x4).
    """
    if n_aux < 1 or n_base < 1:
        raise KVPError(f"cannot map {n_base} base layers onto {n_aux} auxiliary layers")
    per, extra = divmod(n_base, n_aux)
    if per == 0:
        raise KVPError(f"the auxiliary model ({n_aux} layers) is deeper than the base ({n_base})")
    mapping: list[int] = []
    for j in range(n_aux):
        mapping += [j] * (per + (1 if j < extra else 0))
    return mapping


def _merge_heads(x: mx.array) -> mx.array:
    B, H, L, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * D)


def _split_heads(x: mx.array, shape: KVShape) -> mx.array:
    B, L, _ = x.shape
    return x.reshape(B, L, shape.heads, shape.head_dim).transpose(0, 2, 1, 3)


class KVPredictor(nn.Module):
    """Predicts every base layer's raw keys and values from the auxiliary model's raw K/V."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.key_transforms = [
            nn.Linear(config.aux_kv[j].dim, config.base_kv[i].dim, bias=True)
            for i, j in enumerate(config.mapping)
        ]
        self.value_transforms = [
            nn.Linear(config.aux_kv[j].dim, config.base_kv[i].dim, bias=True)
            for i, j in enumerate(config.mapping)
        ]

    @property
    def mapping(self) -> list[int]:
        return self.config.mapping

    def predict_layer(
        self, i: int, aux_keys: mx.array, aux_values: mx.array
    ) -> tuple[mx.array, mx.array]:
        """Base layer ``i``'s raw (pre-norm, pre-RoPE) keys and values, ``[B, H, L, D]`` each."""
        shape = self.config.base_kv[i]
        k = _split_heads(self.key_transforms[i](_merge_heads(aux_keys)), shape)
        v = _split_heads(self.value_transforms[i](_merge_heads(aux_values)), shape)
        return k, v

    def __call__(
        self, aux_keys: Sequence[mx.array], aux_values: Sequence[mx.array]
    ) -> list[tuple[mx.array, mx.array]]:
        """Raw K/V per auxiliary layer (``[B, H, L, D]``) -> predicted raw K/V per base layer."""
        return [
            self.predict_layer(i, aux_keys[j], aux_values[j])
            for i, j in enumerate(self.config.mapping)
        ]

    def set_identity(self) -> "KVPredictor":
        """Weight I, bias 0 for every map (needs equal in/out dims); for tests and sanity checks."""
        for lin in [*self.key_transforms, *self.value_transforms]:
            out_dim, in_dim = lin.weight.shape
            if out_dim != in_dim:
                raise KVPError(f"identity predictor needs equal dims, got {in_dim} -> {out_dim}")
            lin.weight = mx.eye(out_dim, dtype=lin.weight.dtype)
            lin.bias = mx.zeros((out_dim,), dtype=lin.bias.dtype)
        return self

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = dict(tree_flatten(self.parameters()))
        mx.save_safetensors(str(directory / PREDICTOR_WEIGHTS), weights, metadata={"format": "mlx"})
        (directory / PREDICTOR_CONFIG).write_text(json.dumps(self.config.to_json(), indent=2))


def load_predictor(directory: str | Path) -> KVPredictor:
    """Load ``predictor.json`` + ``predictor.safetensors``, checking every tensor's shape."""
    directory = Path(directory)
    cfg_path, w_path = directory / PREDICTOR_CONFIG, directory / PREDICTOR_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise KVPError(f"predictor file missing: {p}")
    try:
        config = PredictorConfig.from_json(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise KVPError(f"{cfg_path} is not valid JSON: {e}") from None
    predictor = KVPredictor(config)
    try:
        weights = mx.load(str(w_path))
    except Exception as e:  # mlx raises RuntimeError/ValueError on corrupt files
        raise KVPError(f"cannot read {w_path}: {e}") from None
    if not isinstance(weights, dict):  # a .npy file loads as one array
        raise KVPError(f"{w_path} is not a safetensors file")
    expected = dict(tree_flatten(predictor.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise KVPError(
            f"{w_path} does not fit {cfg_path}: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    for name, ref in expected.items():
        if weights[name].shape != ref.shape:
            raise KVPError(
                f"predictor tensor {name}: expected shape {tuple(ref.shape)}, found {tuple(weights[name].shape)}"
            )
    predictor.load_weights(list(weights.items()))
    return predictor
