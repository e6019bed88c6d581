"""Read `torch.save` zip archives without PyTorch and without running pickle code.

A modern `.pt` file is a zip holding ``<root>/data.pkl`` (a pickle of the saved object) and one raw
little-endian file per storage, ``<root>/data/<key>``. The pickle refers to storages through
persistent ids ``('storage', <storage type>, key, location, numel)`` and rebuilds tensors with
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.

`_SafeUnpickler` resolves only those few globals, each to a harmless stand-in defined here;
any other global (``os.system``, ``builtins.exec``, ...) is refused with a `KVPError`. Tensors come
back as `LazyTensor` records; their bytes are read from the zip only when `LazyTensor.to_mlx`
is called, so a converter holds one tensor's source bytes at a time.
"""

from __future__ import annotations

import io
import pickle
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from kvp_mlx.errors import KVPError

# torch storage class name -> (element dtype name, numpy dtype used to read the raw bytes)
_STORAGE_TYPES: dict[str, tuple[str, str]] = {
    "FloatStorage": ("float32", "f4"),
    "DoubleStorage": ("float64", "f8"),
    "HalfStorage": ("float16", "f2"),
    "BFloat16Storage": ("bfloat16", "u2"),  # no numpy bfloat16: read the bits, reinterpret in mlx
    "LongStorage": ("int64", "i8"),
    "IntStorage": ("int32", "i4"),
    "ShortStorage": ("int16", "i2"),
    "CharStorage": ("int8", "i1"),
    "ByteStorage": ("uint8", "u1"),
    "BoolStorage": ("bool", "?"),
}


def _corrupt(path: str | Path, detail: object) -> KVPError:
    return KVPError(f"corrupt or truncated checkpoint {path}: {detail}")


@dataclass(frozen=True)
class StorageType:
    """Stand-in for a class such as ``torch.FloatStorage``."""

    name: str

    @property
    def dtype(self) -> str:
        return _STORAGE_TYPES[self.name][0]


@dataclass(frozen=True)
class StorageRef:
    """A storage in the archive: ``data/<key>`` holding ``numel`` elements of ``dtype``."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class LazyTensor:
    """A strided view into a storage; nothing is read until `to_mlx` or `to_numpy`."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    archive: "TorchArchive" = field(repr=False, compare=False)

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(_np_dtype(self.dtype)).itemsize

    def to_numpy(self) -> np.ndarray:
        """The tensor as a numpy array (bfloat16 comes back as its raw uint16 bits)."""
        flat = self.archive.read_storage(self.storage)
        if self.size == 0:
            return np.zeros(self.shape, dtype=flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.size:
            raise _corrupt(self.archive.path, f"tensor view exceeds storage {self.storage.key}")
        if self.stride == _contiguous_strides(self.shape):
            return flat[self.offset : self.offset + self.size].reshape(self.shape)
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.shape,
            strides=[s * flat.itemsize for s in self.stride],
            writeable=False,
        )
        return np.ascontiguousarray(view)

    def to_mlx(self, dtype: mx.Dtype | None = None) -> mx.array:
        """Read the tensor into an evaluated mlx array, cast to ``dtype`` when given."""
        a = mx.array(self.to_numpy())
        if self.dtype == "bfloat16":
            a = a.view(mx.bfloat16)
        if dtype is not None and a.dtype != dtype:
            a = a.astype(dtype)
        mx.eval(a)  # materialize now so the source bytes can be freed
        return a


def _np_dtype(dtype: str) -> str:
    for name, np_name in _STORAGE_TYPES.values():
        if name == dtype:
            return np_name
    raise KeyError(dtype)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


# ---- stand-ins for the torch functions a state dict's pickle calls --------------------------------


class _TensorTypeMarker:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.parameter.Parameter`` as a type argument."""


def _check_ints(name: str, values: object) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise KVPError(f"malformed tensor record in checkpoint: {name} is {values!r}")
    return tuple(values)


def _make_rebuild_tensor(archive: "TorchArchive") -> Callable[..., LazyTensor]:
    def rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored) -> LazyTensor:
        if not isinstance(storage, StorageRef) or not isinstance(storage_offset, int):
            raise KVPError("malformed tensor record in checkpoint (storage or offset)")
        shape, strides = _check_ints("size", size), _check_ints("stride", stride)
        if len(shape) != len(strides):
            raise KVPError("malformed tensor record in checkpoint: size and stride differ in length")
        return LazyTensor(storage, storage_offset, shape, strides, archive)

    return rebuild_tensor_v2


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_ignored):
    if not isinstance(data, LazyTensor):
        raise KVPError("malformed parameter record in checkpoint")
    return data


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that knows only the globals a tensor state dict needs."""

    def __init__(self, file: io.BufferedIOBase, archive: "TorchArchive"):
        super().__init__(file)
        self._archive = archive
        rebuild = _make_rebuild_tensor(archive)

        def rebuild_from_type_v2(func, new_type, args, state):
            # torch wraps tensors with Python attributes this way; accept only plain tensors.
            if func not in (rebuild, _rebuild_parameter) or not isinstance(new_type, _TensorTypeMarker):
                raise KVPError("checkpoint holds a tensor subclass; refusing to rebuild it")
            return func(*args)

        marker = _TensorTypeMarker()
        self._globals: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): rebuild,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): rebuild_from_type_v2,
            ("torch", "Tensor"): marker,
            ("torch.nn.parameter", "Parameter"): marker,
        }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._globals:
            return self._globals[(module, name)]
        if module == "torch" and name in _STORAGE_TYPES:
            return StorageType(name)
        raise KVPError(
            f"checkpoint {self._archive.path} refers to the global {module}.{name}, which a weights "
            "file does not need; refusing to load it (only tensors and plain containers are allowed)"
        )

    def persistent_load(self, pid: Any) -> StorageRef:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], StorageType)
            or not isinstance(pid[2], str)
            or not isinstance(pid[4], int)
        ):
            raise KVPError(f"checkpoint {self._archive.path} has an unknown persistent id {pid!r:.80}")
        return StorageRef(key=pid[2], dtype=pid[1].dtype, numel=pid[4])


class TorchArchive:
    """An open `torch.save` zip archive. Use as a context manager, or call `close`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise KVPError(f"checkpoint not found: {self.path}")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if not magic.startswith(b"PK"):
            raise KVPError(_describe_non_zip(self.path, magic))
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise _corrupt(self.path, e) from None
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            self._zip.close()
            raise KVPError(f"{self.path} is a zip file but not a torch.save checkpoint (no data.pkl)")
        self.root = pkl[0].split("/")[0]
        self._names = set(names)
        self._byteorder = "<"
        if f"{self.root}/byteorder" in self._names:
            order = self._read(f"{self.root}/byteorder").decode(errors="replace").strip()
            if order not in ("little", "big"):
                raise _corrupt(self.path, f"unknown byteorder {order!r}")
            self._byteorder = "<" if order == "little" else ">"

    def __enter__(self) -> "TorchArchive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def _read(self, name: str) -> bytes:
        try:
            with self._zip.open(name) as f:
                return f.read()
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError, ValueError) as e:
            raise _corrupt(self.path, f"{name}: {e}") from None

    def load(self) -> Any:
        """Unpickle ``data.pkl`` with the safe unpickler; tensors come back as `LazyTensor`."""
        data = self._read(f"{self.root}/data.pkl")
        try:
            return _SafeUnpickler(io.BytesIO(data), self).load()
        except KVPError:
            raise
        except Exception as e:  # any malformed pickle: EOFError, UnpicklingError, TypeError, ...
            raise _corrupt(self.path, f"data.pkl: {type(e).__name__}: {e}") from None

    def read_storage(self, ref: StorageRef) -> np.ndarray:
        """A storage's elements as a 1-D numpy array in native byte order."""
        name = f"{self.root}/data/{ref.key}"
        if name not in self._names:
            raise _corrupt(self.path, f"storage {ref.key} is missing")
        dtype = np.dtype(self._byteorder + _np_dtype(ref.dtype))
        expected = ref.numel * dtype.itemsize
        size = self._zip.getinfo(name).file_size
        if size != expected:  # checked before reading, so a bad record cannot make us allocate
            raise _corrupt(self.path, f"storage {ref.key} holds {size} bytes, expected {expected}")
        flat = np.frombuffer(self._read(name), dtype=dtype)
        return flat if dtype.isnative else flat.astype(dtype.newbyteorder("="))


def _describe_non_zip(path: Path, magic: bytes) -> str:
    if magic.startswith(b"\x80") or magic[:1] in (b"c", b"("):
        return (
            f"{path} uses the legacy (pre-1.6, non-zip) torch.save format, which is not supported; "
            "re-save it with a recent PyTorch: torch.save(torch.load(p), p)"
        )
    if not magic:
        return f"corrupt or truncated checkpoint {path}: the file is empty"
    return f"{path} is not a PyTorch checkpoint (not a zip archive)"
