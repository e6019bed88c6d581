"""The restricted torch.save reader: tensors, views, dtypes, and refusing everything else."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx

from convert_helpers import FIXTURES, Storage, Tensor, bf16_bits, tensor, write_torch_zip
from kvp_mlx.convert.state_dict import model_tensors
from kvp_mlx.convert.torch_zip import LazyTensor, TorchArchive
from kvp_mlx.errors import KVPError


def load(path):
    with TorchArchive(path) as archive:
        return {k: (v.to_numpy().copy() if isinstance(v, LazyTensor) else v) for k, v in archive.load().items()}


def test_reads_the_fixture_checkpoint_lazily():
    with TorchArchive(FIXTURES / "pub_kvpc_gpt_test.pt") as archive:
        sd = archive.load()
        emb = sd["base.token_embeddings.weight"]
        assert isinstance(emb, LazyTensor)  # nothing read yet
        assert emb.shape == (64, 128) and emb.dtype == "float32"
        a = emb.to_mlx()
        assert a.dtype == mx.float32 and a.shape == (64, 128)
        raw = zipfile.ZipFile(FIXTURES / "pub_kvpc_gpt_test.pt").read(f"{archive.root}/data/{emb.storage.key}")
        np.testing.assert_array_equal(np.array(a), np.frombuffer(raw, "<f4").reshape(64, 128))


def test_round_trip_with_views_offsets_and_shared_storage(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal(60).astype(np.float32)
    shared = Storage("float32", base)
    obj = OrderedDict(
        whole=Tensor(shared, 0, (6, 10), (10, 1)),
        transposed=Tensor(shared, 0, (10, 6), (1, 10)),  # a non-contiguous view
        offset_rows=Tensor(shared, 20, (2, 10), (10, 1)),
        every_other=Tensor(shared, 1, (3, 5), (20, 2)),
        scalar=Tensor(shared, 7, (), ()),
        ints=tensor(np.arange(5), "int64"),
    )
    got = load(write_torch_zip(tmp_path / "v.pt", obj))
    m = base.reshape(6, 10)
    np.testing.assert_array_equal(got["whole"], m)
    np.testing.assert_array_equal(got["transposed"], m.T)
    np.testing.assert_array_equal(got["offset_rows"], m[2:4])
    np.testing.assert_array_equal(
        got["every_other"], [[base[1 + 20 * i + 2 * j] for j in range(5)] for i in range(3)]
    )
    assert got["scalar"].shape == () and got["scalar"] == base[7]
    np.testing.assert_array_equal(got["ints"], np.arange(5))


def test_big_endian_archive(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    path = write_torch_zip(tmp_path / "be.pt", OrderedDict(w=tensor(a), n=tensor(np.arange(3), "int64")),
                           byteorder="big")
    got = load(path)
    np.testing.assert_array_equal(got["w"], a)
    np.testing.assert_array_equal(got["n"], np.arange(3))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storages(tmp_path, dtype):
    a = np.linspace(-3, 3, 24, dtype=np.float32).reshape(4, 6)
    path = write_torch_zip(tmp_path / "h.pt", OrderedDict(w=tensor(a, dtype)))
    with TorchArchive(path) as archive:
        t = archive.load()["w"]
        assert t.dtype == dtype
        got = t.to_mlx()
        assert got.dtype == getattr(mx, dtype)
        as32 = np.array(t.to_mlx(mx.float32))
    if dtype == "bfloat16":
        expected = (bf16_bits(a).astype(np.uint32) << 16).view(np.float32)
    else:
        expected = a.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(as32, expected)


def test_training_checkpoint_with_module_prefix(tmp_path):
    a = np.ones((2, 3), np.float32)
    ckpt = {
        "epoch": 3,
        "iterations": 1000,
        "best_metric": 1.5,
        "model_state_dict": OrderedDict([("module.layer.weight", tensor(a))]),
        "optim_state_dict": {"state": {0: {"step": tensor(np.array(5.0))}}, "param_groups": [{"lr": 0.1}]},
    }
    path = write_torch_zip(tmp_path / "train.pt", ckpt)
    with TorchArchive(path) as archive:
        tensors = model_tensors(archive.load(), str(path))
        assert list(tensors) == ["layer.weight"]
        np.testing.assert_array_equal(tensors["layer.weight"].to_numpy(), a)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_System, _Exec])
@pytest.mark.parametrize("protocol", [2, 4])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, payload, protocol):
    marker = tmp_path / "MARKER"
    evil = pickle.dumps({"w": payload(marker)}, protocol=protocol)
    path = write_torch_zip(tmp_path / "evil.pt", OrderedDict(w=tensor(np.zeros(2))), pickle_bytes=evil)
    with TorchArchive(path) as archive, pytest.raises(KVPError) as err:
        archive.load()
    name = "system" if payload is _System else "exec"
    assert f".{name}" in str(err.value) and "refusing" in str(err.value)
    assert not marker.exists()


def test_unknown_storage_type_and_bad_persistent_id_are_refused(tmp_path):
    bad = (
        pickle.PROTO + b"\x02" + pickle.GLOBAL + b"torch\nSecretStorage\n" + pickle.STOP
    )
    path = write_torch_zip(tmp_path / "s.pt", {}, pickle_bytes=bad)
    with TorchArchive(path) as archive, pytest.raises(KVPError, match="torch.SecretStorage"):
        archive.load()
    bad_pid = pickle.PROTO + b"\x02" + pickle.BINUNICODE + b"\x03\x00\x00\x00abc" + pickle.BINPERSID + pickle.STOP
    path = write_torch_zip(tmp_path / "p.pt", {}, pickle_bytes=bad_pid)
    with TorchArchive(path) as archive, pytest.raises(KVPError, match="persistent id"):
        archive.load()


def test_truncated_not_zip_legacy_and_empty_files(tmp_path):
    data = (FIXTURES / "pub_kvpc_elm.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(KVPError, match="corrupt or truncated checkpoint"):
        TorchArchive(tmp_path / "half.pt")
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(KVPError, match="legacy"):
        TorchArchive(tmp_path / "legacy.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(KVPError, match="not a PyTorch checkpoint"):
        TorchArchive(tmp_path / "text.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(KVPError, match="empty"):
        TorchArchive(tmp_path / "empty.pt")
    with pytest.raises(KVPError, match="not found"):
        TorchArchive(tmp_path / "nope.pt")


def test_corrupt_storage_bytes_and_sizes_are_caught(tmp_path):
    path = write_torch_zip(tmp_path / "c.pt", OrderedDict(w=tensor(np.arange(64, dtype=np.float32))))
    raw = bytearray(path.read_bytes())
    i = raw.index(np.arange(64, dtype=np.float32)[10:12].tobytes())
    raw[i] ^= 0xFF  # flip bits inside the storage: the zip CRC no longer matches
    path.write_bytes(bytes(raw))
    with TorchArchive(path) as archive:
        t = archive.load()["w"]
        with pytest.raises(KVPError, match="corrupt or truncated"):
            t.to_numpy()
    # a tensor record claiming more elements than its storage holds
    short = Storage("float32", np.zeros(4, np.float32))
    path = write_torch_zip(tmp_path / "v.pt", OrderedDict(w=Tensor(short, 2, (4,), (1,))))
    with TorchArchive(path) as archive, pytest.raises(KVPError, match="exceeds storage"):
        archive.load()["w"].to_numpy()
