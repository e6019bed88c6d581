"""Saved sessions (``--prompt-cache-file``): mlx-lm's prompt-cache format (``save_prompt_cache``,
safetensors + metadata) holding the decoder's and the auxiliary's caches, with the tokens, the
predicted positions and the model's identity in the metadata. Written to a temporary file and
renamed; a file from another model, a truncated or corrupt one is refused with one line.

Compressed caches (EpiCache, :class:`~kvp_mlx.epicache.cache.CompressedKVCache`: kept entries,
their mask and true positions) are saved in the same format; a session with a KV budget also
records its policy, budget, block and episodes, and keeps every episode's cache (after the
decoder's, in episode order), so a loaded session continues exactly as the saved one would have.

A repair in progress is saved too (its exact cache of the first positions, after the auxiliary's),
so a loaded session resumes it where it stopped. Only a session whose invariants hold is written
(:meth:`Session.verify`), and a loaded one is verified the same way.

Integrity: the metadata holds ``checksum``, the SHA-256 of what the file stores (every tensor's
name, dtype, shape and bytes in name order, then the canonical JSON of the rest of the metadata),
checked on load: a file with flipped bits is refused ("is corrupt (checksum mismatch)"). Files of
version 1 (written before the checksum) still load, unverified (:func:`read_metadata` gives
``checksum`` None, and the chat says so); they are written back with a checksum."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache

from kvp_mlx.conversation.session import Session, _RepairState
from kvp_mlx.epicache.cache import CompressedKVCache, enable_compressed_caches
from kvp_mlx.epicache.episodes import Episodes, Utterance
from kvp_mlx.epicache.memory import BoundedMemory
from kvp_mlx.errors import KVPError
from kvp_mlx.methods import FilledCache, get_method
from kvp_mlx.methods.base import counted_positions
from kvp_mlx.model import KVPModel, resolve_entry

FORMAT = "kvp-mlx-session"
VERSION = "3"  # 3: mlx-lm reads it too; 2: with a checksum and a repair in progress; 1 (no checksum)
VERSIONS = ("1", "2", VERSION)
CONTINUE = ("turn", "message")  # what the next prompt is: a new turn, or more of the open user message
# Cache classes a file may name (mlx-lm's load_prompt_cache looks names up in its cache module).
CACHE_CLASSES = {"KVCache", "RotatingKVCache", "QuantizedKVCache", "ConcatenateKVCache", "ChunkedKVCache",
                 "CompressedKVCache", "ArraysCache", "MambaCache"}  # the last two: recurrent states


def model_identity(model: KVPModel) -> str:
    """A fingerprint of the model a session belongs to: the configs and a sample of the weights of
    the base, the auxiliary and the predictor (the same directory gives the same fingerprint)."""
    h = hashlib.sha256()
    h.update(json.dumps(model.base_config, sort_keys=True, default=str).encode())
    for module in (model.base, model.aux, model.predictor):
        if module is None:
            h.update(b"none")
            continue
        for name, value in tree_flatten(module.parameters()):  # type: ignore[str-unpack]  # a list
            assert isinstance(value, mx.array)
            h.update(name.encode() + str(tuple(value.shape)).encode() + str(value.dtype).encode())
        first = tree_flatten(module.parameters())[0][1]  # type: ignore[index]  # a list of (name, array)
        assert isinstance(first, mx.array)
        h.update(np.array(first.reshape(-1)[:4096].astype(mx.float32)).tobytes())
    return h.hexdigest()[:32]


def save_session(session: Session, path: str | Path, continue_as: str = "turn") -> Path:
    """Write ``session`` (both caches, tokens, predicted positions, the model's identity; a bounded
    memory's settings, state and every episode cache) atomically to ``path`` (``.safetensors``).

    ``continue_as``: ``"turn"`` (the next prompt is a new turn) or ``"message"`` (the history ends in
    an open user message the next prompt continues, as ``mlx_lm.cache_prompt`` writes it).

    mlx-lm reads the file too (``mlx_lm.generate --prompt-cache-file``): ``model`` is the decoder's
    own mlx-lm directory, ``tokenizer_config`` is there, and mlx-lm's list of cache classes names
    only the decoder's layers; the auxiliary's, a repair's and other episodes' caches are tensors
    after them (which ``load_prompt_cache`` leaves out), their classes in ``cache_classes``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise KVPError(f"a prompt cache file must end in .safetensors, got {path}")
    assert session.caches is not None
    try:
        session.verify()
    except KVPError as e:
        raise KVPError(f"internal: not saving an inconsistent session to {path}: {e}") from None
    caches = session.caches
    aux = caches.draft_cache or []
    state = session._repair
    repair = state.cache if state is not None else []
    kv = session.kv
    if kv is not None and not isinstance(kv, BoundedMemory):
        raise KVPError(f"cannot save a session whose memory is a {type(kv).__name__} (only BoundedMemory is saved)")
    episodes: list = []
    if kv is not None:
        episodes = [c for i, cache in enumerate(kv.caches) if i != kv.active for c in cache]
    metadata = {
        "kv": json.dumps(_kv_state(kv)),
        "format": FORMAT, "version": VERSION, "model": str(session.model.path),
        "kvp_model": str(session.model.path), "model_identity": model_identity(session.model),
        "method": str(session.method), "continue": continue_as,
        "decoder_layers": str(len(caches.cache)), "aux_layers": str(len(aux)),
        "tokens": json.dumps(session.tokens), "predicted": json.dumps(session.predicted),
        "max_kv_size": json.dumps(session.max_kv_size), "system_prompt": json.dumps(session.system_prompt),
        "method_options": json.dumps(session.method_options, default=str),
        "repair": json.dumps(None if state is None else dict(start=state.start, position=state.position,
                                                              layers=len(repair))),
    }
    if continue_as not in CONTINUE:
        raise KVPError(f"internal: continue_as must be one of {CONTINUE}, not {continue_as!r}")
    metadata.update(model=_decoder_dir(session), tokenizer_config=json.dumps({}))
    layers = caches.cache + aux + repair + episodes
    metadata["cache_classes"] = json.dumps([type(c).__name__ for c in layers])
    arrays, flat = _as_written(layers, metadata)
    flat = {k: v for k, v in flat.items() if not k.startswith("1.") or int(k[2:]) < len(caches.cache)}
    flat["0.checksum"] = checksum(arrays, flat)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KVPError(f"cannot save the session to {path}: {e.strerror or e}") from None
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.safetensors")
    try:
        _write_file(tmp, arrays, flat)
        os.replace(tmp, path)
    except OSError as e:
        raise KVPError(f"cannot save the session to {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_file(path: Path, arrays: dict[str, mx.array], flat: dict[str, str]) -> None:
    """What mlx-lm's ``save_prompt_cache`` writes: the tensors and the flat metadata."""
    mx.save_safetensors(str(path), arrays, flat)


def _decoder_dir(session: Session) -> str:
    """The directory mlx-lm loads the session's decoder from (mlx-lm reads the file's ``model``):
    a plain mlx-lm directory itself, a KV Prediction directory's base (or auxiliary, for method
    ``aux``); the KV Prediction directory where the decoder has none (a layer-pruned auxiliary)."""
    model = session.model
    root = model.path
    if root is None:
        return ""
    if not model.config:
        return str(root)
    key = "aux" if get_method(str(session.method)).capabilities.decoder == "aux" else "base"
    if isinstance(model.config.get(key), dict) and "base_layers" in model.config[key]:
        return str(root)
    try:
        return str(resolve_entry(Path(root), model.config, key))
    except KVPError:
        return str(root)


def _as_written(layers: list, metadata: dict[str, str]) -> tuple[dict[str, mx.array], dict[str, str]]:
    """The tensors and the flat metadata mlx-lm's ``save_prompt_cache`` writes for ``layers``."""
    scalars: list = [""]
    arrays: dict[str, mx.array] = {}
    for key, value in tree_flatten([c.state for c in layers]):  # type: ignore[str-unpack]  # a list
        if isinstance(value, mx.array):
            arrays[key] = value
            continue
        if isinstance(value, (bool, int, float)):
            scalars.append((key, "scalar"))
            value = mx.array(value)
        elif isinstance(value, str):
            scalars.append((key, "string"))
            value = mx.array([ord(c) for c in value])
        elif value is None:
            scalars.append((key, "none"))
            value = mx.array([])
        else:
            raise KVPError(f"internal: a cache state holds a {type(value).__name__}")
        arrays[key] = value
    flat = dict(tree_flatten([metadata, [type(c).__name__ for c in layers], scalars]))
    return arrays, {k: str(v) for k, v in flat.items()}


def checksum(arrays: dict[str, mx.array], flat: dict[str, str]) -> str:
    """SHA-256 of a session file's tensors (name order: name, dtype, shape, bytes) and the canonical
    JSON of its flat metadata (without the checksum itself)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        if a.size:
            h.update(np.array(a.view(mx.uint8) if a.dtype == mx.bfloat16 else a).tobytes())
    rest = {k: v for k, v in flat.items() if k != "0.checksum"}
    h.update(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + h.hexdigest()


def _kv_state(kv: BoundedMemory | None) -> dict | None:
    """A KV budget's settings and state (episodes: centroids, medoids, texts; utterances)."""
    if kv is None:
        return None
    ep = kv.episodes
    return dict(kv.spec(), active=kv.active, peak_entries=kv.peak_entries, n_caches=len(kv.caches),
                clustered_windows=kv.clustered_windows, prior_windows=kv.prior_windows,
                utterances=[[u.speaker, u.text] for u in kv.utterances],
                episodes=None if ep is None else dict(centroids=np.asarray(ep.centroids).tolist(),
                                                       labels=np.asarray(ep.labels).tolist(), medoids=ep.medoids,
                                                       texts=ep.texts))


def _restore_kv(model: KVPModel, state: dict, active: list, others: list, path: Path) -> BoundedMemory:
    """The :class:`BoundedMemory` of a saved session (its caches: the decoder's, then the others)."""
    try:
        kv = BoundedMemory(model, state["policy"], state["budget"], block=state["block"],
                           n_episodes=state["n_episodes"], n_medoids=state["n_medoids"], window=state["window"],
                           level=state["level"], seed=state["seed"])
        n, layers = int(state["n_caches"]), len(active)
        if len(others) != (n - 1) * layers:
            raise ValueError("episode caches")
        rest = [others[i * layers : (i + 1) * layers] for i in range(n - 1)]
        kv.active = int(state["active"])
        kv.caches = rest[: kv.active] + [active] + rest[kv.active :]
        kv.peak_entries = int(state["peak_entries"])
        kv.clustered_windows = int(state["clustered_windows"])
        kv.prior_windows = [str(w) for w in state["prior_windows"]]
        kv.utterances = [Utterance(str(a), str(b)) for a, b in state["utterances"]]
        ep = state["episodes"]
        if ep is not None:
            kv.episodes = Episodes(np.asarray(ep["centroids"], dtype=np.float64), np.asarray(ep["labels"]),
                                   [list(m) for m in ep["medoids"]], list(ep["texts"]))
            kv.scorers = kv.episode_scorers(kv.episodes.texts)
            if len(kv.scorers) != n:
                raise ValueError("episodes")
    except (KeyError, ValueError, TypeError) as e:
        raise KVPError(f"{path}: malformed KV budget metadata ({type(e).__name__}: {e})") from None
    return kv


def _load_caches(arrays: dict[str, mx.array], flat: dict[str, str], classes: list[str]) -> list:
    """mlx-lm's prompt-cache format read back, with compressed caches as well as mlx-lm's own
    (``classes``: every layer's, the decoder's and those after them)."""
    _, _, scalars = tree_unflatten(list(flat.items()))
    values: dict[str, Any] = dict(arrays)
    for pos, kind in scalars[1:]:
        a = values[pos]
        if kind == "scalar":
            values[pos] = a.item()
        elif kind == "string":
            values[pos] = "".join(chr(i) for i in a.tolist())
        elif kind == "none":
            values[pos] = None
        else:
            raise ValueError(f"unknown scalar kind {kind!r}")
    states = tree_unflatten(list(values.items()))
    ours = {"CompressedKVCache": CompressedKVCache}
    return [(ours.get(c) or getattr(mlx_cache, c)).from_state(state) for c, state in zip(classes, states)]


def _read(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """A safetensors file's tensors and flat metadata, or a one-line error in our words."""
    if path.is_dir():
        raise KVPError(f"{path} is a directory, not a prompt cache file")
    if not path.is_file():
        raise KVPError(f"prompt cache file not found: {path}")
    try:
        loaded = mx.load(str(path), return_metadata=True)
    except OSError as e:
        raise KVPError(f"cannot read prompt cache file {path}: {e.strerror or e}") from None
    except Exception:  # mlx's own messages for a damaged file quote its JSON parser: not ours to show
        raise KVPError(f"cannot read prompt cache file {path}: truncated or corrupt (not a readable "
                       "safetensors file)") from None
    if not isinstance(loaded, tuple):
        raise KVPError(f"cannot read prompt cache file {path}: truncated or corrupt (not a safetensors file)")
    arrays, raw = loaded
    return dict(arrays), {str(k): str(v) for k, v in raw.items()}


def read_metadata(path: Path) -> dict[str, Any]:
    """The session's facts from a file, checked (format, version, cache classes, fields).

    mlx-lm's format flattens ``[metadata, classes, scalars]``: ours under ``0.<key>``, the cache
    class names under ``1.<i>``.
    """
    return _parse_metadata(path, _read(path)[1])


def _parse_metadata(path: Path, flat: dict[str, str]) -> dict[str, Any]:
    raw = {k[2:]: v for k, v in flat.items() if k.startswith("0.")}
    names = [v for _, v in sorted((int(k[2:]), v) for k, v in flat.items() if k.startswith("1."))]
    if raw.get("format") != FORMAT:
        if names and "model" in raw and "tokenizer_config" in raw:
            return _mlx_lm_metadata(path, raw, names)
        hint = " (an mlx-lm prompt cache? kvp-mlx needs a file written by kvp-mlx)" if names else ""
        raise KVPError(f"{path} is not a kvp-mlx session file{hint}")
    if raw.get("version") not in VERSIONS:
        raise KVPError(f"{path}: unsupported session file version {raw.get('version')!r} "
                       f"(this kvp-mlx reads {', '.join(VERSIONS)})")
    try:
        meta = {
            "model": raw.get("kvp_model", raw["model"]), "identity": raw["model_identity"], "method": raw["method"],
            "decoder_layers": int(raw["decoder_layers"]), "aux_layers": int(raw["aux_layers"]),
            "tokens": json.loads(raw["tokens"]), "predicted": [tuple(p) for p in json.loads(raw["predicted"])],
            "max_kv_size": json.loads(raw["max_kv_size"]), "system_prompt": json.loads(raw["system_prompt"]),
            "method_options": json.loads(raw["method_options"]),
            "kv": json.loads(raw.get("kv", "null")), "repair": json.loads(raw.get("repair", "null")),
            "checksum": raw.get("checksum"), "version": raw["version"],
            "continue": raw.get("continue", "turn"), "mlx_lm": False,
        }
        if "cache_classes" in raw:  # version 3: mlx-lm's class list names the decoder's layers only
            names = json.loads(raw["cache_classes"])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("cache_classes")
    except (KeyError, ValueError, TypeError) as e:
        raise KVPError(f"{path}: malformed session metadata ({type(e).__name__}: {e})") from None
    if meta["continue"] not in CONTINUE:
        raise KVPError(f"{path}: malformed session metadata (continue {meta['continue']!r})")
    meta["classes"] = names
    bad = sorted({n for n in names if n not in CACHE_CLASSES})
    if bad:
        raise KVPError(f"{path}: unknown cache class(es) {', '.join(bad)}")
    if not all(isinstance(t, int) for t in meta["tokens"]):
        raise KVPError(f"{path}: malformed session metadata (tokens)")
    if meta["version"] != "1" and meta["checksum"] is None:
        raise KVPError(f"{path} is corrupt (its checksum is missing)")
    repair = meta["repair"]
    if repair is not None and not (isinstance(repair, dict) and all(isinstance(repair.get(k), int)
                                                                    for k in ("start", "position", "layers"))):
        raise KVPError(f"{path}: malformed session metadata (repair)")
    return meta


def _mlx_lm_metadata(path: Path, raw: dict[str, str], names: list[str]) -> dict[str, Any]:
    """The facts of a file ``mlx_lm.cache_prompt`` wrote: the model it names and its caches. It
    stores neither the token ids nor the prompt text, so ``tokens`` is None (unknown); its history
    ends in an open user message (``continue``: the next prompt continues it, as mlx-lm's does)."""
    bad = sorted({n for n in names if n not in CACHE_CLASSES})
    if bad:
        raise KVPError(f"{path}: unknown cache class(es) {', '.join(bad)}")
    try:
        tokenizer_config = json.loads(raw["tokenizer_config"])
    except ValueError:
        raise KVPError(f"{path}: malformed mlx-lm prompt cache metadata (tokenizer_config)") from None
    return {"model": raw["model"], "identity": None, "method": "base", "decoder_layers": len(names),
            "aux_layers": 0, "tokens": None, "predicted": [], "max_kv_size": None, "system_prompt": None,
            "method_options": {}, "kv": None, "repair": None, "checksum": None, "version": None,
            "continue": "message", "mlx_lm": True, "classes": names, "tokenizer_config": tokenizer_config}


def load_session(model: KVPModel, path: str | Path, *, mlx_lm_files: bool = False) -> Session:
    """A session saved by :func:`save_session`, refused with one line if it belongs to another model
    or the file is truncated or corrupt. ``mlx_lm_files``: also a file ``mlx_lm.cache_prompt``
    wrote (:func:`load_mlx_lm_prompt_cache`; its token ids are unknown)."""
    path = Path(path)
    arrays, flat = _read(path)
    meta = _parse_metadata(path, flat)
    if meta["mlx_lm"]:
        if not mlx_lm_files:
            raise KVPError(f"{path} is an mlx-lm prompt cache: it holds no token ids, so it cannot be continued "
                           "as a conversation (continue it with kvp-mlx generate --prompt-cache-file)")
        return _mlx_lm_session(model, path, arrays, flat, meta)
    if meta["checksum"] is not None and checksum(arrays, flat) != meta["checksum"]:
        raise KVPError(f"{path} is corrupt (checksum mismatch)")
    if meta["identity"] != model_identity(model):
        raise KVPError(f"{path} was saved for another model ({meta['model']}); load it with that model")
    kv_state = meta["kv"]
    try:
        caches = _load_caches(arrays, flat, meta["classes"])
    except Exception as e:  # the arrays did not fit the classes: a damaged file
        raise KVPError(f"cannot read prompt cache file {path} (truncated or corrupt?): {type(e).__name__}") from None
    n_dec, n_aux = meta["decoder_layers"], meta["aux_layers"]
    n_repair = meta["repair"]["layers"] if meta["repair"] is not None else 0
    repair_cache = caches[n_dec + n_aux : n_dec + n_aux + n_repair]
    caches, others = caches[: n_dec + n_aux], caches[n_dec + n_aux + n_repair :]
    if others and kv_state is None:
        raise KVPError(f"{path}: holds {len(caches) + len(others)} cache layers, its metadata says {n_dec} + {n_aux}")
    if len(caches) != n_dec + n_aux:
        raise KVPError(f"{path}: holds {len(caches)} cache layers, its metadata says {n_dec} + {n_aux}")
    spec = get_method(meta["method"])
    decoder = model.aux if spec.capabilities.decoder == "aux" else model.base
    if decoder is None or (n_aux and model.aux is None):
        raise KVPError(f"{path} needs a KV Prediction model (method {meta['method']})")
    dec_cache, aux_cache = caches[:n_dec], caches[n_dec:] or None
    if len(dec_cache) != len(decoder.layers) or (aux_cache is not None and model.aux is not None
                                                 and len(aux_cache) != len(model.aux.layers)):
        raise KVPError(f"{path}: its caches do not fit this model's layers")
    held = counted_positions(dec_cache)  # None: recurrent states only (mamba), which count no positions
    if held is not None and held != len(meta["tokens"]):
        raise KVPError(f"{path}: the cache holds {held} positions for "
                       f"{len(meta['tokens'])} tokens (corrupt)")
    kv = None
    if kv_state is not None or "CompressedKVCache" in meta["classes"]:
        enable_compressed_caches(decoder)  # compressed caches give each layer its own mask
    if kv_state is not None:
        kv = _restore_kv(model, kv_state, dec_cache, others, path)
    filled = FilledCache(dec_cache, decoder, aux_cache)
    repair = None
    if meta["repair"] is not None:
        if len(repair_cache) != n_repair or n_repair != len(model.base.layers):
            raise KVPError(f"{path}: its repair cache does not fit this model's layers")
        repair = _RepairState(repair_cache, meta["repair"]["start"], meta["repair"]["position"])
    session = Session(model, method=meta["method"], max_kv_size=meta["max_kv_size"],
                      system_prompt=meta["system_prompt"], method_options=meta["method_options"],
                      tokens=meta["tokens"], predicted=meta["predicted"], caches=filled, kv=kv, _repair=repair)
    try:
        session.verify()
    except KVPError as e:
        raise KVPError(f"{path}: {e} (corrupt)") from None
    return session


UNKNOWN_TOKEN = 0  # stands for each token of an mlx-lm prompt cache's history (it stores no ids)


def _mlx_lm_session(model: KVPModel, path: Path, arrays: dict[str, mx.array], flat: dict[str, str],
                    meta: dict[str, Any]) -> Session:
    """A ``base`` session on the cache of a file ``mlx_lm.cache_prompt`` wrote: exact base K/V of a
    history whose token ids the file does not store (nor the prompt text): each is
    :data:`UNKNOWN_TOKEN`. The cache alone decides the continuation (attention reads only K/V), so
    it is exact; what reads the history's ids (repetition or presence penalties, a save, the server's
    prefix cache) must not be given such a session (``kvp-mlx generate`` refuses the penalties)."""
    try:
        caches = _load_caches(arrays, flat, meta["classes"])
    except Exception as e:
        raise KVPError(f"cannot read prompt cache file {path} (truncated or corrupt?): {type(e).__name__}") from None
    if len(caches) != len(model.base.layers):
        raise KVPError(f"{path}: its {len(caches)} cache layers do not fit this model's {len(model.base.layers)} "
                       f"layers (it was written for {meta['model']})")
    held = counted_positions(caches)
    if held is None:
        raise KVPError(f"{path}: a cache of recurrent states only counts no positions (not supported)")
    try:
        return Session.resume(model, [UNKNOWN_TOKEN] * held, caches)
    except (KVPError, ValueError) as e:
        raise KVPError(f"{path}: its caches do not fit this model ({e})") from None


def mlx_lm_cached_ids(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> list[int]:
    """The token ids ``mlx_lm.cache_prompt`` caches for ``prompt``: through the chat template an open
    user message (``continue_final_message``: no end of turn), else the text with special tokens."""
    if getattr(tokenizer, "has_chat_template", False):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                             continue_final_message=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    if system_prompt is not None:
        raise KVPError("a system prompt needs the chat template (this tokenizer has none)")
    return list(tokenizer.encode(prompt))


def mlx_lm_continuation_ids(tokenizer: Any, prompt: str, use_chat_template: bool | None = None,
                            chat_template_config: dict | None = None) -> list[int]:
    """The token ids ``mlx_lm.generate --prompt-cache-file`` adds after a cached open user message:
    through the chat template, the rendered prompt from the message's content on (the rest of the
    message, its end and the generation prompt); else the text with special tokens."""
    templated = getattr(tokenizer, "has_chat_template", False) and use_chat_template is not False
    if not templated:
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(chat_template_config or {}))
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "<query>"}], tokenize=False,
                                          add_generation_prompt=True)
    return list(tokenizer.encode(text[probe.index("<query>"):], add_special_tokens=False))
