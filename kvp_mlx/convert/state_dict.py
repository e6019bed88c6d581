"""corenet state-dict keys -> mlx-lm openelm weight names, with every key and shape checked.

corenet and mlx-lm's openelm use the same module names (mlx-lm adds a ``transformer.`` prefix and
calls the untied output layer ``lm_head``), the same qkv packing (q heads, then k, then v) and the
same GLU split of ``ffn.proj_1`` (first half gated by swish), so tensors copy over unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvp_mlx.errors import KVPError
from kvp_mlx.predictor import KVShape, PredictorConfig

from .corenet_config import OpenELMConfig
from .torch_zip import LazyTensor

# Keys a training checkpoint may keep the model's state dict under, in order of preference.
_STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")
# Wrappers that prefix parameter names: DDP / FSDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

KVP_PREFIXES = {"base": "base.", "aux": "auxiliary.", "predictor": "predicter.auxkv_to_basekv."}


def _list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def model_tensors(obj: Any, source: str) -> dict[str, LazyTensor]:
    """The model's tensors from a plain state dict or a training checkpoint, wrapper prefixes removed."""
    if isinstance(obj, Mapping) and not any(isinstance(v, LazyTensor) for v in obj.values()):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            raise KVPError(
                f"{source} holds no tensors and no {' / '.join(_STATE_DICT_KEYS)} entry "
                f"(top-level keys: {_list([str(k) for k in obj])})"
            )
    if not isinstance(obj, Mapping):
        raise KVPError(f"{source} does not hold a state dict (found {type(obj).__name__})")
    tensors: dict[str, LazyTensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, LazyTensor):
            raise KVPError(f"{source}: state-dict entry {key!r} is not a named tensor")
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in tensors:
            raise KVPError(f"{source}: {key!r} and another key both name {name!r}")
        tensors[name] = value
    return tensors


def split_kvp(tensors: dict[str, LazyTensor]) -> dict[str, dict[str, LazyTensor]]:
    """Split a KV Prediction state dict into base / aux / predictor parts (prefixes removed)."""
    parts: dict[str, dict[str, LazyTensor]] = {role: {} for role in KVP_PREFIXES}
    stray = []
    for key, t in tensors.items():
        for role, prefix in KVP_PREFIXES.items():
            if key.startswith(prefix):
                parts[role][key[len(prefix) :]] = t
                break
        else:
            stray.append(key)
    if stray:
        raise KVPError(f"unexpected keys in checkpoint: {_list(stray)}")
    return parts


def corenet_shapes(cfg: OpenELMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a corenet general_gpt with this config has, with its shape."""
    d, hd = cfg.model_dim, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embeddings.weight": (cfg.vocab_size, d)}
    for i, (hq, hkv, ffn) in enumerate(zip(cfg.num_query_heads, cfg.num_kv_heads, cfg.ffn_dims())):
        p = f"layers.{i}."
        shapes[p + "attn.qkv_proj.weight"] = ((hq + 2 * hkv) * hd, d)
        if cfg.normalize_qk_projections:
            shapes[p + "attn.q_norm.weight"] = (hd,)
            shapes[p + "attn.k_norm.weight"] = (hd,)
        shapes[p + "attn.out_proj.weight"] = (d, hq * hd)
        shapes[p + "ffn.proj_1.weight"] = (2 * ffn if cfg.ffn_with_glu else ffn, d)
        shapes[p + "ffn.proj_2.weight"] = (d, ffn)
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
    shapes["norm.weight"] = (d,)
    if not cfg.share_input_output_layers:
        shapes["classifier.weight"] = (cfg.vocab_size, d)
    return shapes


def check_tensors(
    tensors: dict[str, LazyTensor], expected: dict[str, tuple[int, ...]], what: str, prefix: str = ""
) -> None:
    """Raise a `KVPError` naming missing / unexpected keys or the first shape mismatch.

    ``prefix`` is what the checkpoint puts before these keys (e.g. ``base.``), for the message.
    """
    missing = [prefix + k for k in expected if k not in tensors]
    unexpected = [prefix + k for k in tensors if k not in expected]
    if missing:
        raise KVPError(f"{what}: missing keys in checkpoint: {_list(missing)}")
    if unexpected:
        raise KVPError(f"{what}: unexpected keys in checkpoint: {_list(unexpected)}")
    for key, shape in expected.items():
        found = tuple(tensors[key].shape)
        if found != shape:
            raise KVPError(f"{what}: shape mismatch for {prefix}{key}: expected {shape}, found {found}")


def _mlx_name(corenet_key: str) -> str:
    return "lm_head.weight" if corenet_key == "classifier.weight" else "transformer." + corenet_key


def openelm_weights(
    tensors: dict[str, LazyTensor], cfg: OpenELMConfig, what: str, prefix: str = ""
) -> tuple[OpenELMConfig, dict[str, LazyTensor]]:
    """Check one model's corenet tensors and name them as mlx-lm's openelm does.

    The vocabulary size comes from the embedding (corenet pads it, e.g. to 32128): the returned
    config carries the checkpoint's row count.
    """
    emb = tensors.get("token_embeddings.weight")
    if emb is not None and len(emb.shape) == 2:
        cfg = cfg.with_vocab_size(emb.shape[0])
    check_tensors(tensors, corenet_shapes(cfg), what, prefix)
    return cfg, {_mlx_name(k): t for k, t in tensors.items()}


def kv_shapes(cfg: OpenELMConfig) -> list[KVShape]:
    return [KVShape(h, cfg.head_dim) for h in cfg.num_kv_heads]


def predictor_weights(
    tensors: dict[str, LazyTensor], mapping: list[int], base: OpenELMConfig, aux: OpenELMConfig
) -> tuple[PredictorConfig, dict[str, LazyTensor]]:
    """Check corenet's ``predicter.auxkv_to_basekv`` tensors against the mapping and both models."""
    config = PredictorConfig(list(mapping), base_kv=kv_shapes(base), aux_kv=kv_shapes(aux))
    config.validate()  # mapping length and range, with messages naming the problem
    expected: dict[str, tuple[int, ...]] = {}
    for i, j in enumerate(mapping):
        out_dim, in_dim = config.base_kv[i].dim, config.aux_kv[j].dim
        for kind in ("key_transforms", "value_transforms"):
            expected[f"{kind}.{i}.weight"] = (out_dim, in_dim)
            expected[f"{kind}.{i}.bias"] = (out_dim,)
    check_tensors(tensors, expected, "predictor", KVP_PREFIXES["predictor"])
    return config, dict(tensors)
