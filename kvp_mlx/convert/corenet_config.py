"""corenet training YAML -> per-layer OpenELM configs, exactly as corenet computes them.

corenet names its models (``general_gpt.model_name``) and derives every layer's head count and FFN
width from a small table (``general_gpt.py`` for `general_gpt`, ``kv_prediction.py`` for
`layer_pruned_general_gpt`). `named_config` reproduces that arithmetic; models whose names are not
in the tables are described by an HF-style OpenELM ``config.json`` (`config_from_json`). The result,
`OpenELMConfig`, is what mlx-lm's ``openelm`` model reads from ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from numbers import Number
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from kvp_mlx.errors import KVPError

SUPPORTED_LM_NAMES = ("general_gpt", "layer_pruned_general_gpt")


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """corenet's rounding of a width to a multiple of ``divisor`` (never more than 10% down)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class _Arch:
    """One row of corenet's model tables (before per-layer expansion)."""

    layers: int
    model_dim: int
    head_dim: int
    gqa_groups: int
    ffn: float | tuple[float, float]
    qkv: float | tuple[float, float] = 1.0
    select_layers: tuple[int, ...] | None = None
    qk_norm: bool = True
    tied: bool = True


_GPT_TEST: dict[str, Any] = dict(model_dim=128, gqa_groups=1, ffn=(0.25, 0.75), qkv=(0.25, 0.5))
_ELM_1_1B: dict[str, Any] = dict(layers=28, model_dim=2048, head_dim=64, gqa_groups=4, ffn=(0.5, 4.0), qkv=(0.5, 1.0))
_ELM_3B: dict[str, Any] = dict(layers=36, model_dim=3072, head_dim=128, gqa_groups=4, ffn=(0.5, 4.0), qkv=(0.5, 1.0))


def _half_depth(arch: dict[str, Any], full_layers: int) -> dict[str, Any]:
    # corenet's "-0.50l" models: half the layers, the multiplier ramps stopping one full-depth step short.
    step = 1 / (full_layers - 1)
    return dict(
        arch,
        layers=full_layers // 2,
        ffn=(0.5, 4.0 - step * (4.0 - 0.5)),
        qkv=(0.5, 1.0 - step * (1.0 - 0.5)),
    )


def _every_fourth(n: int) -> tuple[int, ...]:
    return tuple(range(0, n, 4))


def _drop_every_fourth(n: int) -> tuple[int, ...]:
    return tuple(i for i in range(n) if i % 4 != 3)


# corenet general_gpt.py `gpt_configs` (model type general_gpt)
GPT_CONFIGS: dict[str, _Arch] = {
    "gpt-test": _Arch(layers=1, head_dim=64, **_GPT_TEST),
    "gpt-1_3B": _Arch(layers=24, model_dim=2048, head_dim=64, gqa_groups=4, ffn=3.0),
    "OpenELM-270M": _Arch(16, 1280, 64, 4, ffn=(0.5, 4.0), qkv=(0.5, 1.0)),
    "OpenELM-450M": _Arch(20, 1536, 64, 4, ffn=(0.5, 4.0), qkv=(0.5, 1.0)),
    "OpenELM-1_1B": _Arch(**_ELM_1_1B),
    "OpenELM-3B": _Arch(**_ELM_3B),
}

# corenet kv_prediction.py `layer_pruned_gpt_configs` (model type layer_pruned_general_gpt)
LAYER_PRUNED_CONFIGS: dict[str, _Arch] = {
    "gpt-test-base": _Arch(layers=3, head_dim=64, **_GPT_TEST),
    "gpt-test-aux": _Arch(layers=2, head_dim=48, **_GPT_TEST),
    "OpenELM-1_1B-0.25l": _Arch(**_ELM_1_1B, select_layers=_every_fourth(28)),
    "OpenELM-1_1B-0.50l": _Arch(**_half_depth(_ELM_1_1B, 28)),
    "OpenELM-1_1B-0.75l": _Arch(**_ELM_1_1B, select_layers=_drop_every_fourth(28)),
    "OpenELM-3B-0.25l": _Arch(**_ELM_3B, select_layers=_every_fourth(36)),
    "OpenELM-3B-0.50l": _Arch(**_half_depth(_ELM_3B, 36)),
    "OpenELM-3B-0.75l": _Arch(**_ELM_3B, select_layers=_drop_every_fourth(36)),
}


def known_model_names() -> list[str]:
    return [*GPT_CONFIGS, *LAYER_PRUNED_CONFIGS]


@dataclass
class OpenELMConfig:
    """An OpenELM architecture with per-layer lists, as mlx-lm's ``openelm`` model reads it."""

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    num_query_heads: list[int]
    num_kv_heads: list[int]
    ffn_multipliers: list[float]
    vocab_size: int
    ffn_dim_divisor: int = 256
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rope_freq_constant: float = 10000
    rms_norm_eps: float = 1e-6
    model_name: str = field(default="", compare=False)
    # the context length the model was trained for (corenet's general_gpt.max_context_length), kept
    # in config.json under Hugging Face OpenELM's name; mlx-lm's openelm ignores it
    max_context_length: int | None = field(default=None, compare=False)

    def ffn_dims(self) -> list[int]:
        return [
            int(make_divisible(m * self.model_dim, self.ffn_dim_divisor)) for m in self.ffn_multipliers
        ]

    def with_vocab_size(self, vocab_size: int) -> "OpenELMConfig":
        return replace(self, vocab_size=vocab_size)

    def to_mlx_config(self) -> dict[str, Any]:
        """The ``config.json`` dict for an mlx-lm OpenELM directory."""
        d = asdict(self)
        name = d.pop("model_name")
        if d["max_context_length"] is None:
            del d["max_context_length"]
        return {"model_type": "openelm", **d, **({"corenet_model_name": name} if name else {})}


def _expand(mult: float | Sequence[float], layers: int, what: str) -> list[Any]:
    """corenet's per-layer multipliers: a scalar repeats, a pair is a linspace rounded to 2 places."""
    if isinstance(mult, (float, Number)):  # float: lets mypy narrow the pair branch to Sequence[float]
        return [mult] * layers
    if len(mult) == 2:
        # round() on numpy float64s, as corenet does (numpy rounds half to even on the scaled value)
        return [round(v, 2) for v in np.linspace(mult[0], mult[1], num=layers, dtype=float)]
    raise KVPError(f"{what} multipliers must be a number or a pair, got {mult!r}")


def named_config(name: str, vocab_size: int) -> OpenELMConfig:
    """The per-layer config corenet builds for a model named in its tables."""
    arch = GPT_CONFIGS.get(name) or LAYER_PRUNED_CONFIGS.get(name)
    if arch is None:
        raise KVPError(f"unknown model name {name!r}; known names: {', '.join(known_model_names())}")
    head_multiple = arch.gqa_groups
    qkv = _expand(arch.qkv, arch.layers, "qkv")
    q_dims = [int(make_divisible(arch.model_dim * m, arch.head_dim * head_multiple)) for m in qkv]
    q_heads = [q // arch.head_dim for q in q_dims]
    kv_heads = [h // arch.gqa_groups for h in q_heads]
    ffn = [float(m) for m in _expand(arch.ffn, arch.layers, "ffn")]
    layers = list(range(arch.layers))
    if arch.select_layers is not None:
        # heads and FFN widths are those of the full-depth model's selected layers
        layers = list(arch.select_layers)
    return OpenELMConfig(
        num_transformer_layers=len(layers),
        model_dim=arch.model_dim,
        head_dim=arch.head_dim,
        num_query_heads=[q_heads[i] for i in layers],
        num_kv_heads=[kv_heads[i] for i in layers],
        ffn_multipliers=[ffn[i] for i in layers],
        vocab_size=vocab_size,
        normalize_qk_projections=arch.qk_norm,
        share_input_output_layers=arch.tied,
        model_name=name,
    )


def config_from_json(path: str | Path, vocab_size: int | None = None) -> OpenELMConfig:
    """Read an HF-style OpenELM ``config.json`` (per-layer lists) into an `OpenELMConfig`."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise KVPError(f"model config not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KVPError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise KVPError(f"{path} must hold a JSON object")
    required = ("num_transformer_layers", "model_dim", "head_dim", "num_query_heads", "num_kv_heads", "ffn_multipliers")
    missing = [k for k in required if k not in d]
    if missing:
        raise KVPError(f"{path} is not an OpenELM config: missing {', '.join(missing)}")
    for key, expected in (("activation_fn_name", "swish"), ("normalization_layer_name", "rms_norm")):
        if d.get(key, expected) != expected:
            raise KVPError(f"{path}: {key}={d[key]!r} is not supported (mlx-lm's openelm needs {expected!r})")
    if not d.get("ffn_with_glu", True):
        raise KVPError(f"{path}: ffn_with_glu=false is not supported by mlx-lm's openelm")
    n = int(d["num_transformer_layers"])
    per_layer = {}
    for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
        v = d[key]
        v = [v] * n if isinstance(v, Number) else list(v)
        if len(v) != n:
            raise KVPError(f"{path}: {key} has {len(v)} entries for {n} layers")
        per_layer[key] = v
    vocab = vocab_size if vocab_size is not None else d.get("vocab_size")
    if vocab is None:
        raise KVPError(f"{path}: no vocab_size")
    return OpenELMConfig(
        num_transformer_layers=n,
        model_dim=int(d["model_dim"]),
        head_dim=int(d["head_dim"]),
        num_query_heads=[int(h) for h in per_layer["num_query_heads"]],
        num_kv_heads=[int(h) for h in per_layer["num_kv_heads"]],
        ffn_multipliers=[float(m) for m in per_layer["ffn_multipliers"]],
        vocab_size=int(vocab),
        ffn_dim_divisor=int(d.get("ffn_dim_divisor", 256)),
        normalize_qk_projections=bool(d.get("normalize_qk_projections", True)),
        share_input_output_layers=bool(d.get("share_input_output_layers", True)),
        rope_freq_constant=d.get("rope_freq_constant", 10000),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        model_name=str(d.get("model_name", "")),
        max_context_length=_context_length(d.get("max_context_length"), str(path)),
    )


# ---- the training YAML ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A sub-model as the YAML names it."""

    lm_name: str  # general_gpt | layer_pruned_general_gpt
    model_name: str
    vocab_size: int | None
    max_context_length: int | None = None


@dataclass(frozen=True)
class TrainingConfig:
    """What a converter needs from a corenet training YAML."""

    kind: str  # "kv_prediction" or "single"
    models: dict[str, ModelRef]  # {"base", "aux"} or {"model"}
    mapping: list[int] | None = None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """corenet's flattening of nested YAML dicts into dotted option names."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(_flatten(v, key))
            else:
                out[key] = v
    return out


_LM = "model.language_modeling"


def _model_ref(opts: dict[str, Any], where: str) -> ModelRef:
    lm_name = opts.get(f"{_LM}.name")
    if lm_name not in SUPPORTED_LM_NAMES:
        raise KVPError(
            f"{where}: model type {lm_name!r} is not supported (expected one of {', '.join(SUPPORTED_LM_NAMES)})"
        )
    model_name = opts.get(f"{_LM}.general_gpt.model_name")
    if not model_name:
        raise KVPError(f"{where}: no {_LM}.general_gpt.model_name")
    vocab = opts.get(f"{_LM}.general_gpt.vocab_size")
    context = _context_length(opts.get(f"{_LM}.general_gpt.max_context_length"), where)
    return ModelRef(lm_name, str(model_name), int(vocab) if vocab is not None else None, context)


def _context_length(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVPError(f"{where}: max_context_length must be a positive integer, got {value!r}")
    return value


def _sub_model_opts(opts: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    # corenet wraps each sub-model config in a one-element list and applies it over the parent's options
    entry = opts.get(key)
    if not isinstance(entry, list) or not entry or not isinstance(entry[0], dict):
        raise KVPError(f"{path}: {key} must be a one-element list holding the sub-model's config")
    return {**opts, **_flatten(entry[0])}


def read_training_yaml(path: str | Path) -> TrainingConfig:
    """Parse the model part of a corenet training YAML."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KVPError(f"config not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise KVPError(f"{path} is not valid YAML: {e}") from None
    opts = _flatten(raw)
    name = opts.get(f"{_LM}.name")
    if name is None:
        raise KVPError(f"{path} has no {_LM}.name; is it a corenet language-model config?")
    if name != "kv_prediction":
        return TrainingConfig("single", {"model": _model_ref(opts, str(path))})
    kvp = f"{_LM}.kv_prediction"
    base = _model_ref(_sub_model_opts(opts, f"{kvp}.base_model", path), f"{path} (base model)")
    aux = _model_ref(_sub_model_opts(opts, f"{kvp}.auxiliary_model", path), f"{path} (auxiliary model)")
    mapping = opts.get(f"{kvp}.auxkv_num_layers_to_basekv_num_layers")
    if not isinstance(mapping, list) or not all(isinstance(j, int) for j in mapping):
        raise KVPError(f"{path}: {kvp}.auxkv_num_layers_to_basekv_num_layers must be a list of layer indices")
    return TrainingConfig("kv_prediction", {"base": base, "aux": aux}, list(mapping))


def resolve_config(ref: ModelRef, role: str, json_path: str | Path | None, flag: str) -> OpenELMConfig:
    """A sub-model's config: from its ``config.json`` when given, else from corenet's tables."""
    if json_path is not None:
        cfg = config_from_json(json_path, vocab_size=ref.vocab_size)
        # the training YAML's context length is the checkpoint's; the config.json's is a fallback
        return replace(cfg, max_context_length=ref.max_context_length or cfg.max_context_length)
    if ref.model_name not in known_model_names():
        raise KVPError(
            f"unknown model name {ref.model_name!r} for the {role} model; known names: "
            f"{', '.join(known_model_names())}; for other models pass {flag} with an OpenELM config.json"
        )
    return replace(named_config(ref.model_name, ref.vocab_size or 32000), max_context_length=ref.max_context_length)
