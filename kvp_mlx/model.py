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

Predictor-only directories (format_version 2) hold just the predictor and name the models:
"base" and "aux" may each be a path relative to DIR, an absolute path (``~`` expanded), a Hugging
Face repo id, or ``{"path": PATH_OR_REPO, "revision": REV}``; "aux" may also be
``{"base_layers": [0, 2, 4]}``, a layer-pruned copy of the base built at load time (KVP-LP).
Each entry resolves to, in order: a directory relative to DIR, an absolute/expanded directory,
a repo id through :func:`resolve_model_path` (HF_HUB_OFFLINE honoured).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.adapters import kv_shapes
from kvp_mlx.errors import KVPError
from kvp_mlx.layer_pruning import layer_pruned
from kvp_mlx.methods import PrefillResult, enter
from kvp_mlx.predictor import KVPredictor, load_predictor
from kvp_mlx.runtime_env import checkpoint_dtype, resolve_dtype

KVP_CONFIG = "kvp_config.json"
FORMAT_NAME = "kvp-mlx"
FORMAT_VERSION = 1  # a self-contained directory: base/ and aux/ inside it
REFERENCE_FORMAT_VERSION = 2  # names models outside itself; version-1-only readers refuse it cleanly
READABLE_VERSIONS = (FORMAT_VERSION, REFERENCE_FORMAT_VERSION)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


@dataclass
class KVPModel:
    """The loaded model. ``prefill`` runs a prefill method; decoding then uses ``.base`` alone."""

    base: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    aux: nn.Module | None = None
    predictor: KVPredictor | None = None
    path: Path | None = None
    config: dict = field(default_factory=dict)  # kvp_config.json ({} for a plain mlx-lm directory)
    dtype: mx.Dtype = mx.float32
    base_config: dict = field(default_factory=dict)  # the base's config.json (context length, ...)

    def prefill(
        self,
        tokens: mx.array | list,
        method: str = "kvp",
        prefill_step_size: int = 2048,
        **options: Any,
    ) -> PrefillResult:
        """Fill the cache for a prompt ``tokens`` [B, T] with a registered prefill method.

        Returns a :class:`kvp_mlx.methods.PrefillResult` with ``.cache`` (the decoder's filled
        cache) and ``.logits`` ([B, vocab], the logits for the last prompt token). On a rank of a
        distributed prefill that does not decode, use :func:`kvp_mlx.methods.run_prefill`.
        """
        return enter(self, method, options).prefill_to_decode(tokens, prefill_step_size)

    @property
    def is_random(self) -> bool:
        """True when the directory says its weights are random (demo or timing models)."""
        return bool(self.config.get("random_weights"))


def write_kvp_config(
    directory: str | Path, source: str, *, base: str | dict = "base", aux: str | dict = "aux", **extra: Any
) -> None:
    """Write ``kvp_config.json``. ``base``/``aux``: the subdirectories of a self-contained directory
    (the default), or references to models elsewhere (see the module docstring), which makes it a
    format_version 2 (predictor-only) directory."""
    self_contained = (base, aux) == ("base", "aux")
    version = FORMAT_VERSION if self_contained else REFERENCE_FORMAT_VERSION
    cfg = {"format": FORMAT_NAME, "format_version": version, "base": base, "aux": aux}
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
    if not is_repo_id(text):
        raise KVPError(f"model directory not found: {text}")
    return _hub_snapshot(text, revision)


def is_repo_id(text: str) -> bool:
    """True for text shaped like a Hugging Face repo id ("owner/name")."""
    return bool(REPO_ID.fullmatch(text)) and not text.startswith((".", "/"))


def _hub_snapshot(text: str, revision: str | None, not_found: str | None = None) -> Path:
    """Download (or find in the cache) repo ``text``; ``not_found`` begins the error message."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision))
    except Exception as e:  # hub errors have many types; all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        not_found = not_found or f"'{text}' is not a local directory and"
        raise KVPError(
            f"{not_found} could not be fetched from the Hugging Face hub{hint}: {type(e).__name__}"
        ) from None


# Files any of which lets transformers' AutoTokenizer build a tokenizer (fast, SentencePiece,
# GPT-2-style BPE, WordPiece or tiktoken).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tiktoken.model")

# A tokenizer must cover at least this fraction of the model's vocabulary (embedding rows).
# Real checkpoints pad the embedding beyond the tokenizer (Qwen2.5: 151665 pieces for 151936 rows,
# 99.8%; corenet's OpenELM: 32000 LLaMA pieces for up to 32128 rows, 99.6%); a tokenizer clearly
# smaller than that (under 99%) is the wrong tokenizer for the model.
MIN_TOKENIZER_COVERAGE = 0.99


def check_tokenizer_covers_vocab(pieces: int, vocab_size: int, what: str) -> None:
    """Refuse a tokenizer with clearly fewer pieces than the model's vocabulary (see `MIN_TOKENIZER_COVERAGE`)."""
    if pieces < MIN_TOKENIZER_COVERAGE * vocab_size:
        raise KVPError(
            f"{what} has {pieces} pieces but the model's vocabulary has {vocab_size} entries; a tokenizer must "
            f"cover at least {MIN_TOKENIZER_COVERAGE:.0%} of the vocabulary (is it the model's own tokenizer?)"
        )


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_MARKERS) or any(directory.glob("*.tiktoken"))


def _unreadable_weights(directory: Path, what: str, error: Exception) -> KVPError:
    """The error for weights mlx cannot read, naming the first unreadable ``*.safetensors`` file."""
    for f in sorted(directory.glob("*.safetensors")):
        try:
            mx.load(str(f))  # reads and checks the header and tensor offsets, not the data
        except Exception as e:  # noqa: BLE001 - mlx raises RuntimeError, but any failure names the file
            return KVPError(f"{what} model weights {f} are unreadable (corrupt or truncated file?): {_one_line(e)}")
    return KVPError(f"cannot load {what} model weights from {directory}: {_one_line(error)}")


def load_lm(directory: Path, what: str = "base") -> tuple[nn.Module, Any, dict]:
    """An mlx-lm model directory: (model, tokenizer, config), with clear errors."""
    import mlx_lm
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # silence "model of type openelm ..." notices from AutoConfig
    if not (directory / "config.json").is_file():
        raise KVPError(f"{what} model directory {directory} has no config.json")
    if not _has_tokenizer(directory):
        # mlx-lm / transformers would report this as a missing sentencepiece package
        raise KVPError(
            f"{what} model directory {directory} has no tokenizer: copy the model's tokenizer.json and "
            "tokenizer_config.json into it (for a corenet checkpoint, convert again with --tokenizer tokenizer.model)"
        )
    try:
        model, tokenizer, config = mlx_lm.load(str(directory), return_config=True)  # type: ignore[misc]  # 3 with return_config
    except ValueError as e:
        msg = _one_line(e)
        if "not supported" in msg or "Model type" in msg:
            raise KVPError(f"{what} model: {msg}") from None
        raise KVPError(f"cannot load {what} model from {directory}: {msg}") from None
    except (FileNotFoundError, OSError) as e:
        raise KVPError(f"cannot load {what} model from {directory}: {_one_line(e)}") from None
    except RuntimeError as e:  # mlx's safetensors reader: truncated or corrupt weights
        raise _unreadable_weights(directory, what, e) from None
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, int):
        check_tokenizer_covers_vocab(
            len(tokenizer.get_vocab()), vocab_size, f"the {what} model's tokenizer in {directory}"
        )
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
    model. ``dtype``: "float32", "float16" or "bfloat16"; default: float32 on the CPU, the
    checkpoint's own dtype on a GPU (for a KV Prediction directory, the base's: the auxiliary and
    the predictor are cast to it). Only floating parameters are cast: quantized weights stay packed.
    """
    if path_or_repo is not None and not isinstance(path_or_repo, (str, os.PathLike)):
        raise KVPError(f"load takes a path or repo id, got {type(path_or_repo).__name__}")
    if dtype is not None and not isinstance(dtype, str):
        raise KVPError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {type(dtype).__name__}")
    if path_or_repo is None:
        if not (DEFAULT_MODEL_DIR / KVP_CONFIG).is_file():
            raise KVPError(
                "this install has no embedded default model (kvp_mlx/default_model; rebuild it with make toyworld); "
                "pass --model DIR"
            )
        path_or_repo = DEFAULT_MODEL_DIR
    root = resolve_model_path(path_or_repo, revision)
    cfg_path = root / KVP_CONFIG
    if not cfg_path.is_file():
        base, tokenizer, base_config = load_lm(root, "base")
        compute_dtype = resolve_dtype(dtype, checkpoint_dtype(base))
        _cast(base, compute_dtype)
        return KVPModel(base=base, tokenizer=tokenizer, path=root, dtype=compute_dtype, base_config=base_config)
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise KVPError(f"{cfg_path} is not valid JSON: {e}") from None
    if config.get("format") != FORMAT_NAME or config.get("format_version") not in READABLE_VERSIONS:
        newer = config.get("format") == FORMAT_NAME and isinstance(config.get("format_version"), int)
        newer = newer and config["format_version"] > max(READABLE_VERSIONS)
        hint = " (written by a newer kvp-mlx; upgrade kvp-mlx)" if newer else ""
        raise KVPError(
            f"{cfg_path}: unsupported format {config.get('format')!r} version {config.get('format_version')!r}{hint}"
        )
    base, tokenizer, base_config = load_lm(resolve_entry(root, config, "base"), "base")
    aux_entry = config.get("aux", "aux")
    if isinstance(aux_entry, dict) and "base_layers" in aux_entry:
        aux = _layer_pruned_aux(base, base_config, aux_entry["base_layers"], cfg_path)
    else:
        aux, aux_tokenizer, _ = load_lm(resolve_entry(root, config, "aux"), "auxiliary")
        check_same_tokenizer(tokenizer, aux_tokenizer)
    predictor = load_predictor(root)
    check_predictor_fits(predictor, base, aux)
    compute_dtype = resolve_dtype(dtype, checkpoint_dtype(base))
    for m in (base, aux, predictor):
        _cast(m, compute_dtype)
    return KVPModel(
        base=base, aux=aux, predictor=predictor, tokenizer=tokenizer,
        path=root, config=config, dtype=compute_dtype, base_config=base_config,
    )


ENTRY_NAMES = {"base": "base model", "aux": "auxiliary model"}


def resolve_entry(root: Path, config: dict, key: str) -> Path:
    """The directory of ``config[key]`` ("base" or "aux"): relative to ``root``, then an absolute
    or ``~`` path, then a Hugging Face repo id (optionally at ``{"revision": ...}``)."""
    entry = config.get(key, key)
    shown = f"'{entry}'" if isinstance(entry, str) else json.dumps(entry)
    where = f"{ENTRY_NAMES[key]} {shown} named in {root / KVP_CONFIG}"
    revision = None
    if isinstance(entry, dict):
        unknown = set(entry) - {"path", "revision"}
        if unknown or not isinstance(entry.get("path"), str):
            forms = '"DIR", "owner/repo" or {"path": ..., "revision": ...}'
            if key == "aux":
                forms += ' or {"base_layers": [...]}'
            raise KVPError(f"{where}: expected {forms}")
        entry, revision = entry["path"], entry.get("revision")
    if not isinstance(entry, str) or not entry:
        raise KVPError(f"{where}: expected a path or a Hugging Face repo id")
    local, expanded = root / entry, Path(entry).expanduser()  # an absolute entry stays absolute
    candidates = [local] + ([expanded] if expanded.is_absolute() else [])  # never relative to the cwd
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    if any(c.exists() for c in candidates):
        raise KVPError(f"{where}: not a directory")
    if not is_repo_id(entry):
        raise KVPError(f"{where}: not found (no directory {root / entry})")
    return _hub_snapshot(entry, revision, not_found=f"{where}: not found (no directory {local}) and")


def _layer_pruned_aux(base: nn.Module, base_config: dict, keep: Any, cfg_path: Path) -> nn.Module:
    """KVP-LP: the auxiliary is the base keeping layers ``keep``, built here rather than stored."""
    if not isinstance(keep, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        raise KVPError(f"auxiliary model named in {cfg_path}: base_layers must be a list of layer indices")
    try:
        aux, _ = layer_pruned(base, base_config, keep)
    except ValueError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KVPError(f"auxiliary model named in {cfg_path}: {first_line}") from None
    return aux


def _cast(module: nn.Module, dtype: mx.Dtype) -> None:
    """Cast the floating parameters (set_dtype's default predicate): packed quantized weights
    (uint32) stay as they are, their scales and biases follow ``dtype``."""
    module.set_dtype(dtype)
    mx.eval(module.parameters())
