"""A KV Prediction model: base + auxiliary + predictor + tokenizer, and its directory format.

Directory layout (written by the converter and the trainer, read by :func:`load`)::

    DIR/
      kvp_config.json        {"format": "kvp-mlx", "format_version": 1, "base": "base", "aux": "aux", "source": "..."}
      predictor.json         layer mapping and per-layer KV shapes
      predictor.safetensors  key_transforms.{i}.* and value_transforms.{i}.*
      base/                  an ordinary mlx-lm model directory
      aux/                   an ordinary mlx-lm model directory

A plain mlx-lm directory (no ``kvp_config.json``) loads as a base-only model: the ``base``
method works, ``kvp`` and ``aux`` raise a clear error.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.adapters import arch_of, kv_shapes
from kvp_mlx.errors import KVPError
from kvp_mlx.predictor import KVPredictor, load_predictor
from kvp_mlx.runtime_env import resolve_dtype

if TYPE_CHECKING:  # kvp_mlx.methods imports this module
    from kvp_mlx.methods import PrefillResult

KVP_CONFIG = "kvp_config.json"
FORMAT_NAME = "kvp-mlx"
FORMAT_VERSION = 1
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


@dataclass
class KVPModel:
    """The loaded model. ``prefill`` runs a prefill method; decoding then uses ``.base`` alone."""

    base: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    aux: nn.Module | None = None
    predictor: KVPredictor | None = None
    path: Path | None = None
    config: dict = field(default_factory=dict)
    dtype: mx.Dtype = mx.float32

    def prefill(
        self,
        tokens: mx.array,
        method: str = "kvp",
        prefill_step_size: int = 2048,
        **options: Any,
    ) -> PrefillResult:
        """Fill the cache for a prompt ``tokens`` [B, T] with a registered prefill method.

        Returns a :class:`kvp_mlx.methods.PrefillResult` with ``.cache`` (the decoder's filled
        cache) and ``.logits`` ([B, vocab], the logits for the last prompt token).
        """
        from kvp_mlx.methods import run_prefill

        return run_prefill(self, tokens, method, prefill_step_size=prefill_step_size, **options)

    @property
    def is_random(self) -> bool:
        """True when the directory says its weights are random (demo or timing models)."""
        return bool(self.config.get("random_weights"))


def write_kvp_config(directory: str | Path, source: str, **extra: Any) -> None:
    cfg = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "base": "base", "aux": "aux"}
    cfg.update(source=source, **extra)
    Path(directory, KVP_CONFIG).write_text(json.dumps(cfg, indent=2))


def resolve_model_path(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id, downloaded (offline mode honoured)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KVPError(f"model path is not a directory: {path}")
        return path
    text = str(path_or_repo)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) or text.startswith((".", "/")):
        raise KVPError(f"model directory not found: {text}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision))
    except Exception as e:  # hub errors have many types; all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise KVPError(
            f"'{text}' is not a local directory and could not be fetched from the Hugging Face hub{hint}: "
            f"{type(e).__name__}"
        ) from None


def load_lm(directory: Path, what: str = "base") -> tuple[nn.Module, Any, dict]:
    """An mlx-lm model directory: (model, tokenizer, config), with clear errors."""
    import mlx_lm
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # silence "model of type openelm ..." notices from AutoConfig
    if not (directory / "config.json").is_file():
        raise KVPError(f"{what} model directory {directory} has no config.json")
    try:
        model, tokenizer, config = mlx_lm.load(str(directory), return_config=True)  # type: ignore[misc]  # 3 with return_config
    except ValueError as e:
        msg = str(e)
        if "not supported" in msg or "Model type" in msg:
            raise KVPError(f"{what} model: {msg}") from None
        raise KVPError(f"cannot load {what} model from {directory}: {msg}") from None
    except (FileNotFoundError, OSError) as e:
        raise KVPError(f"cannot load {what} model from {directory}: {e}") from None
    arch_of(model)  # raises a clear error for an unsupported architecture
    return model, tokenizer, config


def check_same_tokenizer(base_tok: Any, aux_tok: Any) -> None:
    base_vocab, aux_vocab = base_tok.get_vocab(), aux_tok.get_vocab()
    if base_vocab != aux_vocab:
        only_base = len(set(base_vocab.items()) - set(aux_vocab.items()))
        raise KVPError(
            "the base and auxiliary tokenizers differ "
            f"(vocabularies of {len(base_vocab)} and {len(aux_vocab)} entries, {only_base} base entries differ); "
            "KV Prediction needs one tokenizer"
        )


def check_predictor_fits(predictor: KVPredictor, base: nn.Module, aux: nn.Module) -> None:
    """Layer counts and KV shapes of the predictor must match the models it connects."""
    cfg = predictor.config
    base_kv, aux_kv = kv_shapes(base), kv_shapes(aux)
    if len(cfg.mapping) != len(base_kv):
        raise KVPError(
            f"layer mapping has {len(cfg.mapping)} entries but the base model has {len(base_kv)} layers"
        )
    if len(cfg.aux_kv) != len(aux_kv):
        raise KVPError(
            f"predictor expects an auxiliary model with {len(cfg.aux_kv)} layers, it has {len(aux_kv)}"
        )
    for name, want, have in (("base", cfg.base_kv, base_kv), ("auxiliary", cfg.aux_kv, aux_kv)):
        for i, (w, h) in enumerate(zip(want, have)):
            if w != h:
                raise KVPError(
                    f"predictor shape mismatch at {name} layer {i}: predictor expects "
                    f"{w.heads} KV heads x {w.head_dim}, the model has {h.heads} x {h.head_dim}"
                )


def load(
    path_or_repo: str | Path | None = None,
    *,
    dtype: str | None = None,
    revision: str | None = None,
) -> KVPModel:
    """Load a KV Prediction directory (or a plain mlx-lm directory as base-only).

    ``path_or_repo``: a local directory or a Hugging Face repo id; None loads the embedded default
    model. ``dtype``: "float32", "float16" or "bfloat16" (default: float32 on CPU, float16 on GPU).
    """
    if path_or_repo is None:
        if not (DEFAULT_MODEL_DIR / KVP_CONFIG).is_file():
            raise KVPError(
                "this install has no embedded default model (kvp_mlx/default_model; rebuild it with make toyworld); "
                "pass --model DIR"
            )
        path_or_repo = DEFAULT_MODEL_DIR
    root = resolve_model_path(path_or_repo, revision)
    compute_dtype = resolve_dtype(dtype)
    cfg_path = root / KVP_CONFIG
    if not cfg_path.is_file():
        base, tokenizer, _ = load_lm(root, "base")
        _cast(base, compute_dtype)
        return KVPModel(base=base, tokenizer=tokenizer, path=root, dtype=compute_dtype)
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise KVPError(f"{cfg_path} is not valid JSON: {e}") from None
    if config.get("format") != FORMAT_NAME or config.get("format_version") != FORMAT_VERSION:
        raise KVPError(
            f"{cfg_path}: unsupported format {config.get('format')!r} version {config.get('format_version')!r}"
        )
    base, tokenizer, _ = load_lm(root / config.get("base", "base"), "base")
    aux, aux_tokenizer, _ = load_lm(root / config.get("aux", "aux"), "auxiliary")
    check_same_tokenizer(tokenizer, aux_tokenizer)
    predictor = load_predictor(root)
    check_predictor_fits(predictor, base, aux)
    for m in (base, aux, predictor):
        _cast(m, compute_dtype)
    return KVPModel(
        base=base, aux=aux, predictor=predictor, tokenizer=tokenizer,
        path=root, config=config, dtype=compute_dtype,
    )


def _cast(module: nn.Module, dtype: mx.Dtype) -> None:
    module.set_dtype(dtype)
    mx.eval(module.parameters())
