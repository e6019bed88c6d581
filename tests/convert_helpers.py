"""Test helpers for the converter: torch.save-style zip checkpoints written without PyTorch,
the corenet fixture cases, and tiny SentencePiece models.

`write_torch_zip` lays a checkpoint out as torch does (``<root>/data.pkl`` as a protocol-2
pickle whose persistent ids are ``('storage', torch.<Type>Storage, key, 'cpu', numel)``,
``<root>/data/<key>`` raw little-endian bytes, ``version``, ``byteorder``, ...); the pickle opcodes
are emitted by hand, since the stand-in ``torch`` globals cannot be pickled without torch.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

FIXTURES = Path(__file__).parent / "fixtures" / "corenet"
CASES = ["pub_kvpc_gpt_test", "pub_kvpc_elm", "pub_kvplp_elm"]

_STORAGE_NAMES = {
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "float64": "DoubleStorage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "uint8": "ByteStorage",
}


@dataclass(eq=False)
class Storage:
    """A storage: ``data`` (1-D array; bfloat16 as uint16 bits), or ``numel`` + a ``fill`` callable."""

    dtype: str
    data: np.ndarray | None = None
    numel: int = 0
    fill: Callable[[], bytes] | None = None

    def __post_init__(self) -> None:
        if self.data is not None:
            self.numel = int(self.data.size)

    def to_bytes(self, order: str = "<") -> bytes:
        if self.fill is not None:
            return self.fill()
        return np.ascontiguousarray(self.data).astype(self.data.dtype.newbyteorder(order)).tobytes()


@dataclass(eq=False)
class Tensor:
    """A strided view into a `Storage`, as torch records it."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape)))


def tensor(a: np.ndarray, dtype: str = "float32") -> Tensor:
    """A contiguous tensor holding ``a`` stored as ``dtype``."""
    a = np.asarray(a)
    if dtype == "bfloat16":
        flat = bf16_bits(a).reshape(-1)
    else:
        flat = a.astype(dtype).reshape(-1)
    return Tensor(Storage(dtype, flat), 0, tuple(a.shape), contiguous_strides(tuple(a.shape)))


class _PickleWriter:
    """Emits protocol-2 pickle opcodes for dicts, lists, tuples, scalars and `Tensor`s."""

    def __init__(self) -> None:
        self.out = bytearray(pickle.PROTO + b"\x02")
        self.storages: dict[int, tuple[str, Storage]] = {}

    def _global(self, module: str, name: str) -> None:
        self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode()

    def _tuple(self, items) -> None:
        if not items:
            self.out += pickle.EMPTY_TUPLE
            return
        self.out += pickle.MARK
        for item in items:
            self.emit(item)
        self.out += pickle.TUPLE

    def emit(self, obj: Any) -> None:
        out = self.out
        if obj is None:
            out += pickle.NONE
        elif isinstance(obj, bool):
            out += pickle.NEWTRUE if obj else pickle.NEWFALSE
        elif isinstance(obj, int):
            out += pickle.BININT + struct.pack("<i", obj)
        elif isinstance(obj, float):
            out += pickle.BINFLOAT + struct.pack(">d", obj)
        elif isinstance(obj, str):
            raw = obj.encode()
            out += pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw
        elif isinstance(obj, tuple):
            self._tuple(obj)
        elif isinstance(obj, list):
            out += pickle.EMPTY_LIST
            if obj:
                out += pickle.MARK
                for item in obj:
                    self.emit(item)
                out += pickle.APPENDS
        elif isinstance(obj, dict):
            if isinstance(obj, OrderedDict):
                self._global("collections", "OrderedDict")
                out += pickle.EMPTY_TUPLE + pickle.REDUCE
            else:
                out += pickle.EMPTY_DICT
            if obj:
                out += pickle.MARK
                for k, v in obj.items():
                    self.emit(k)
                    self.emit(v)
                out += pickle.SETITEMS
        elif isinstance(obj, Tensor):
            self._tensor(obj)
        else:
            raise TypeError(f"cannot emit {type(obj).__name__}")

    def _tensor(self, t: Tensor) -> None:
        key = self.storages.setdefault(id(t.storage), (str(len(self.storages)), t.storage))[0]
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out += pickle.MARK
        self.out += pickle.MARK + pickle.BINUNICODE + struct.pack("<I", 7) + b"storage"
        self._global("torch", _STORAGE_NAMES[t.storage.dtype])
        self.emit(key)
        self.emit("cpu")
        self.emit(t.storage.numel)
        self.out += pickle.TUPLE + pickle.BINPERSID
        self.emit(t.offset)
        self._tuple(t.shape)
        self._tuple(t.stride)
        self.emit(False)
        self.emit(OrderedDict())
        self.out += pickle.TUPLE + pickle.REDUCE


def _write_aligned(z: zipfile.ZipFile, name: str, data: bytes | Callable[[], bytes], size: int) -> None:
    """A stored zip entry whose data starts on a 64-byte boundary (padding in an "FB" extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = z.fp.tell() + 30 + len(name.encode())
    pad = (-(start + 4)) % 64
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    info.file_size = size
    with z.open(info, "w") as f:
        f.write(data() if callable(data) else data)


def write_torch_zip(
    path: str | Path, obj: Any, root: str = "archive", pickle_bytes: bytes | None = None, byteorder: str = "little"
) -> Path:
    """Write ``obj`` (nested dicts of `Tensor`s and scalars) as torch.save does.

    ``pickle_bytes`` replaces the pickle (for crafted payloads); storages still come from ``obj``.
    """
    path = Path(path)
    w = _PickleWriter()
    w.emit(obj)
    pkl = pickle_bytes if pickle_bytes is not None else bytes(w.out + pickle.STOP)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        _write_aligned(z, f"{root}/data.pkl", pkl, len(pkl))
        for name, data in ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", byteorder.encode())):
            _write_aligned(z, f"{root}/{name}", data, len(data))
        order = "<" if byteorder == "little" else ">"
        for key, storage in w.storages.values():
            itemsize = 2 if storage.dtype == "bfloat16" else np.dtype(storage.dtype).itemsize
            _write_aligned(z, f"{root}/data/{key}", storage.to_bytes(order), storage.numel * itemsize)
        _write_aligned(z, f"{root}/version", b"3\n", 2)
        _write_aligned(z, f"{root}/.data/serialization_id", b"0" * 40, 40)
    return path


# ---- fixture cases -------------------------------------------------------------------------------


def fixture_arrays(case: str) -> "OrderedDict[str, np.ndarray]":
    """The fixture checkpoint's tensors as float32 numpy arrays (read with the converter's reader)."""
    from kvp_mlx.convert.torch_zip import TorchArchive

    with TorchArchive(FIXTURES / f"{case}.pt") as archive:
        return OrderedDict((k, t.to_numpy().copy()) for k, t in archive.load().items())


def rewrite_checkpoint(case: str, path: Path, dtype: str = "float32", edit=None) -> Path:
    """The fixture checkpoint re-saved with storages of ``dtype``; ``edit(dict)`` may change the dict first."""
    arrays = fixture_arrays(case)
    if edit is not None:
        edit(arrays)
    return write_torch_zip(path, OrderedDict((k, tensor(a, dtype)) for k, a in arrays.items()), root=path.stem)


def write_model_configs(case: str, directory: Path) -> dict[str, Path]:
    """The fixture's ``arch.json`` base / aux entries as HF-style OpenELM config.json files."""
    arch = json.loads((FIXTURES / f"{case}.arch.json").read_text())
    paths = {}
    for role in ("base", "aux"):
        paths[role] = directory / f"{case}.{role}.json"
        paths[role].write_text(json.dumps(arch[role]))
    return paths


def edit_yaml(case: str, path: Path, edit) -> Path:
    """The fixture's YAML after ``edit(dict)``."""
    cfg = yaml.safe_load((FIXTURES / f"{case}.yaml").read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


def single_model_yaml(path: Path, model_name: str, vocab_size: int, lm_name: str = "layer_pruned_general_gpt") -> Path:
    cfg = {
        "model": {
            "language_modeling": {
                "name": lm_name,
                "general_gpt": {"model_name": model_name, "vocab_size": vocab_size},
            }
        }
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- SentencePiece -------------------------------------------------------------------------------

_WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bad jocks".split()
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def train_sentencepiece(directory: Path, vocab_size: int, **options: Any) -> Path:
    """Train a tiny SentencePiece model on generated text; returns the ``.model`` path."""
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    made_up = ["".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(300)]
    words = _WORDS * 20 + made_up
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(600)]
    extra = options.pop("extra_text", [])
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines + list(extra)))
    prefix = directory / "sp"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, **options,
    )
    return prefix.with_suffix(".model")


def fixture_tokenizer(directory: Path, vocab_size: int) -> Path:
    """A SentencePiece BPE model with exactly the fixture model's vocabulary size (64 or 128)."""
    return train_sentencepiece(directory, vocab_size, model_type="bpe", character_coverage=1.0)
