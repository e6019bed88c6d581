"""The runtime across its shapes: every architecture x float32/float16/bfloat16 x plain/4-bit
weights, RoPE scaling (llama3, yarn), quantized KV decoding, and the dtype policy of ``load``.

Every case uses the identity fixture (auxiliary = a copy of the base, identity predictor), so KV
Prediction must reproduce the base model: first-token logits within 1e-5 in float32 (2e-2 of the
logits' range in half precision, computed in that dtype) and the same 16 greedy tokens.
Quantized directories come from mlx-lm's own converter and are read back through ``kvp_mlx.load``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import QuantizedKVCache
from mlx_lm.models.rope_utils import Llama3RoPE, YarnRoPE

from kvp_mlx import runtime_env
from kvp_mlx import testing as mb
from kvp_mlx.adapters import kv_shapes
from kvp_mlx.architectures import ARCHITECTURES, TEST_ALIASES
from kvp_mlx.errors import KVPError
from kvp_mlx.model import _cast, load

from decoding import decode_greedy
from conftest import ARCHS, VOCAB, copy_of

DTYPES = ["float32", pytest.param("float16", marks=pytest.mark.slow), pytest.param("bfloat16", marks=pytest.mark.slow)]
Q_BITS, Q_GROUP = 4, 32
KV_BITS, KV_GROUP = 8, 32  # mx.quantize's smallest group is 32: the KV fixture has head_dim 32
# mlx-lm cannot quantize a sliding-window (rotating) cache; these architectures have one.
KV_QUANT_UNSUPPORTED = {"gemma3": "RotatingKVCache Quantization NYI"}
ROPE_SCALING = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}
ROPE_CLASS = {"llama3": Llama3RoPE, "yarn": YarnRoPE}


# The registry's other architectures (conftest's ARCHS have 3-layer fixtures of their own): tiny
# 2-layer identity pairs, plain and 4-bit (a new architecture is one entry and this line covers it).
REGISTERED = sorted(set(ARCHITECTURES) - {TEST_ALIASES.get(a, a) for a in ARCHS})
# MLX's CPU gather_mm (unquantized mixture-of-experts layers) runs float32 only: mlx-lm's own limit,
# the same for the base's prefill as for KV Prediction's.
CPU_HALF_MOE = {"gpt_oss", "mixtral", "qwen3_moe"}


def prompt(batch: int, length: int, seed: int = 0) -> mx.array:
    return mx.random.randint(0, VOCAB, (batch, length), key=mx.random.key(seed))


def identity_dir(root: Path, cfg: dict, tokenizer_dir: Path, seed: int = 0) -> Path:
    base = mb.build_model(cfg, seed=seed)
    pred = mb.make_predictor(base, copy_of(base, cfg), mapping=list(range(mb.num_layers(cfg))), init="identity")
    return mb.save_kvp_dir(root, base, cfg, copy_of(base, cfg), cfg, pred, tokenizer_dir, "test identity", True)


@pytest.fixture(scope="session")
def quantized_dirs(tmp_path_factory, identity_dirs) -> dict[str, Path]:
    """Per architecture: the identity fixture with base and aux quantized by mlx_lm.convert."""
    root = tmp_path_factory.mktemp("quantized")
    return {arch: mb.convert_kvp_dir(identity_dirs[arch], root / arch, q_bits=Q_BITS, q_group_size=Q_GROUP)
            for arch in ARCHS}


@pytest.fixture(scope="session")
def rope_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Llama with llama3 / yarn RoPE scaling, plain and 4-bit."""
    root = tmp_path_factory.mktemp("rope")
    dirs = {}
    for kind, scaling in ROPE_SCALING.items():
        cfg = {**mb.tiny_config("llama", n_layers=3, vocab_size=VOCAB), "rope_scaling": scaling}
        dirs[kind, False] = identity_dir(root / kind, cfg, tokenizer_dir, seed=11)
        dirs[kind, True] = mb.convert_kvp_dir(dirs[kind, False], root / f"{kind}-q", q_bits=Q_BITS,
                                              q_group_size=Q_GROUP)
    return dirs


def wide_head_config(arch: str) -> dict:
    """The tiny config with 32-dim heads (KV quantization groups along the head dim)."""
    cfg = mb.tiny_config(arch, n_layers=3, vocab_size=VOCAB)
    if "hidden_size" in cfg:
        cfg["hidden_size"] = 32 * cfg["num_attention_heads"]  # archs that derive head_dim from it
    cfg["head_dim"] = 32
    return cfg


@pytest.fixture(scope="session")
def kv_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kvquant")
    return {arch: identity_dir(root / arch, wide_head_config(arch), tokenizer_dir, seed=i)
            for i, arch in enumerate(ARCHS)}


def floating_dtypes(module: nn.Module) -> set:
    return {v.dtype for _, v in tree_flatten(module.parameters()) if mx.issubdtype(v.dtype, mx.floating)}


def assert_quantized(model: nn.Module, bits: int) -> None:
    """Every linear and embedding layer is mlx's quantized one, its weights packed uint32."""
    plain = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert not plain, f"not quantized: {plain}"
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert quantized and all(m.weight.dtype == mx.uint32 and m.bits == bits for m in quantized)


def assert_kvp_reproduces_base(model, tokens: mx.array, dtype: mx.Dtype, steps: int = 16) -> None:
    base = model.prefill(tokens, method="base")
    kvp = model.prefill(tokens, method="kvp")
    assert base.logits.dtype == dtype and kvp.logits.dtype == dtype
    diff = mx.abs(base.logits - kvp.logits).max().item()
    if dtype == mx.float32:
        assert diff <= 1e-5, f"first-token logits differ by {diff}"
    else:
        scale = mx.abs(base.logits).max().item()
        assert diff <= 2e-2 * scale, f"first-token logits differ by {diff} (max |logit| {scale})"
    base_tokens, kvp_tokens = decode_greedy(base, steps), decode_greedy(kvp, steps)
    assert base_tokens.shape == (tokens.shape[0], steps)
    assert mx.array_equal(base_tokens, kvp_tokens).item(), f"{base_tokens.tolist()} != {kvp_tokens.tolist()}"


# --- the matrix: architecture x dtype x quantization ------------------------------------------


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "q4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_kvp_reproduces_base(identity_dirs, quantized_dirs, arch, dtype, quantized):
    model = load((quantized_dirs if quantized else identity_dirs)[arch], dtype=dtype)
    want = runtime_env.DTYPES[dtype]
    assert model.dtype == want
    for part in (model.base, model.aux, model.predictor):
        assert floating_dtypes(part) == {want}
    if quantized:
        assert_quantized(model.base, Q_BITS)
        assert_quantized(model.aux, Q_BITS)
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.predictor.named_modules())
    assert_kvp_reproduces_base(model, prompt(2, 11, seed=3), want)


@pytest.fixture(scope="session")
def registered_dirs(tmp_path_factory, tokenizer_dir) -> dict[tuple[str, bool], Path]:
    """Per registered architecture beyond ARCHS: its identity pair, plain and converted to 4 bits."""
    root = tmp_path_factory.mktemp("registered")
    dirs = {}
    for i, arch in enumerate(REGISTERED):
        dirs[arch, False] = identity_dir(root / arch, mb.tiny_config(arch, n_layers=2, vocab_size=VOCAB),
                                         tokenizer_dir, seed=i)
        dirs[arch, True] = mb.convert_kvp_dir(dirs[arch, False], root / f"{arch}-q", q_bits=Q_BITS,
                                              q_group_size=Q_GROUP)
    return dirs


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "q4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", REGISTERED)
def test_every_registered_architecture_reproduces_base(registered_dirs, arch, dtype, quantized):
    model = load(registered_dirs[arch, quantized], dtype=dtype)
    want = runtime_env.DTYPES[dtype]
    if arch in CPU_HALF_MOE and want != mx.float32 and not quantized and mx.default_device() == mx.cpu:
        with pytest.raises(RuntimeError, match="GatherMM"):
            model.prefill(prompt(1, 5), method="base")
        return
    if quantized:  # mlx-lm's own predicate may keep some layers (MoE routers) at 8 bits
        assert not [name for name, m in model.base.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        assert any(getattr(m, "bits", None) == Q_BITS for _, m in model.base.named_modules())
    assert_kvp_reproduces_base(model, prompt(2, 11, seed=3), want)


def test_quantized_aux_is_the_quantized_base(quantized_dirs):
    """The fixture: mlx_lm.convert wrote the quantization config, and the aux holds the very same
    packed weights as the base (it was a copy before quantization)."""
    for arch, d in quantized_dirs.items():
        cfg = json.loads((d / "base" / "config.json").read_text())
        assert cfg["quantization"]["bits"] == Q_BITS and cfg["quantization"]["group_size"] == Q_GROUP
        base = mx.load(str(d / "base" / "model.safetensors"))
        aux = mx.load(str(d / "aux" / "model.safetensors"))
        assert base.keys() == aux.keys() and any(k.endswith(".scales") for k in base)
        assert all(mx.array_equal(base[k], aux[k]).item() for k in base), arch


# --- RoPE scaling -----------------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "q4"])
@pytest.mark.parametrize("kind", list(ROPE_SCALING))
def test_rope_scaling(rope_dirs, kind, quantized):
    model = load(rope_dirs[kind, quantized], dtype="float32")
    for m in (model.base, model.aux):
        assert all(isinstance(layer.self_attn.rope, ROPE_CLASS[kind]) for layer in m.layers)
    # positions past original_max_position_embeddings / low_freq_factor: the scaled frequencies act
    assert_kvp_reproduces_base(model, prompt(1, 40, seed=4), mx.float32)


# --- quantized KV cache during decoding (mlx-lm's generate_step, kv_bits) ------------------------


def greedy_with_quantized_kv(result, steps: int) -> list[int]:
    first = mx.argmax(result.logits, axis=-1)
    tokens = generate_step(
        first, result.decoder, prompt_cache=result.cache, max_tokens=steps - 1,
        kv_bits=KV_BITS, kv_group_size=KV_GROUP, quantized_kv_start=0,
    )
    return [int(first.item())] + [int(t) for t, _ in tokens]


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_kv_decoding(kv_dirs, arch):
    model = load(kv_dirs[arch], dtype="float32")
    assert all(s.head_dim == 32 for s in kv_shapes(model.base))
    tokens = prompt(1, 13, seed=5)
    base, kvp = model.prefill(tokens, method="base"), model.prefill(tokens, method="kvp")
    if arch in KV_QUANT_UNSUPPORTED:  # mlx-lm's own limit, the same for both prefills
        for result in (base, kvp):
            with pytest.raises(NotImplementedError, match=KV_QUANT_UNSUPPORTED[arch]):
                greedy_with_quantized_kv(result, 16)
        return
    base_tokens, kvp_tokens = greedy_with_quantized_kv(base, 16), greedy_with_quantized_kv(kvp, 16)
    assert len(base_tokens) == 16 and base_tokens == kvp_tokens
    for result in (base, kvp):  # generate_step swapped in quantized caches
        assert all(isinstance(c, QuantizedKVCache) and c.bits == KV_BITS for c in result.cache)


# --- dtype policy ---------------------------------------------------------------------------


@pytest.fixture
def policy(monkeypatch):
    """``policy("gpu")`` / ``policy("cpu")``: make the dtype policy see that device."""

    def set_to(device: str) -> None:
        monkeypatch.setattr(runtime_env, "on_gpu", lambda: device == "gpu")

    return set_to


def test_on_gpu_follows_the_default_device(monkeypatch):
    assert runtime_env.on_gpu() is (mx.default_device() == mx.gpu)
    monkeypatch.setattr(runtime_env.mx, "default_device", lambda: mx.Device(mx.gpu))
    assert runtime_env.on_gpu() is True
    monkeypatch.setattr(runtime_env.mx, "default_device", lambda: mx.Device(mx.cpu))
    assert runtime_env.on_gpu() is False


def test_resolve_dtype_policy(policy):
    policy("cpu")
    for ckpt in (mx.bfloat16, mx.float16, mx.float32, None):
        assert runtime_env.resolve_dtype(None, ckpt) == mx.float32
    policy("gpu")
    for ckpt in (mx.bfloat16, mx.float16, mx.float32):
        assert runtime_env.resolve_dtype(None, ckpt) == ckpt
    assert runtime_env.resolve_dtype(None) == mx.float16  # no checkpoint: random-weight models
    for device in ("cpu", "gpu"):
        policy(device)
        assert runtime_env.resolve_dtype("float16", mx.bfloat16) == mx.float16
        assert runtime_env.resolve_dtype("bfloat16", mx.float32) == mx.bfloat16
        with pytest.raises(KVPError, match="unknown dtype 'float64'"):
            runtime_env.resolve_dtype("float64", mx.float32)


def test_checkpoint_dtype_is_the_majority_floating_dtype():
    model = nn.Sequential(nn.Linear(64, 64), nn.RMSNorm(64))
    assert runtime_env.checkpoint_dtype(model) == mx.float32
    model.layers[0].set_dtype(mx.bfloat16)  # 64*64 + 64 bfloat16 values, 64 float32 (the norm)
    assert runtime_env.checkpoint_dtype(model) == mx.bfloat16
    assert runtime_env.checkpoint_dtype(nn.Sequential()) is None


@pytest.fixture(scope="session")
def half_dirs(tmp_path_factory, identity_dirs) -> dict[str, Path]:
    """The llama identity fixture as a bfloat16 and a float16 checkpoint, and a directory with a
    bfloat16 base and a float16 auxiliary."""
    root = tmp_path_factory.mktemp("half")
    dirs = {dt: mb.convert_kvp_dir(identity_dirs["llama"], root / dt, dtype=dt) for dt in ("bfloat16", "float16")}
    mixed = shutil.copytree(dirs["bfloat16"], root / "mixed")
    shutil.rmtree(mixed / "aux")
    shutil.copytree(dirs["float16"] / "aux", mixed / "aux")
    dirs["mixed"] = mixed
    return dirs


def test_bfloat16_checkpoint_stays_bfloat16_on_gpu_and_is_float32_on_cpu(half_dirs, policy):
    stored = {v.dtype for v in mx.load(str(half_dirs["bfloat16"] / "base" / "model.safetensors")).values()}
    assert stored == {mx.bfloat16}
    policy("gpu")
    model = load(half_dirs["bfloat16"])
    assert model.dtype == mx.bfloat16
    for part in (model.base, model.aux, model.predictor):
        assert floating_dtypes(part) == {mx.bfloat16}
    assert_kvp_reproduces_base(model, prompt(1, 9, seed=6), mx.bfloat16, steps=4)
    assert load(half_dirs["bfloat16"], dtype="float16").dtype == mx.float16  # --dtype overrides
    policy("cpu")
    model = load(half_dirs["bfloat16"])
    assert model.dtype == mx.float32
    for part in (model.base, model.aux, model.predictor):
        assert floating_dtypes(part) == {mx.float32}


def test_base_checkpoint_dtype_rules_a_mixed_directory(half_dirs, policy):
    aux_stored = {v.dtype for v in mx.load(str(half_dirs["mixed"] / "aux" / "model.safetensors")).values()}
    assert aux_stored == {mx.float16}
    policy("gpu")
    model = load(half_dirs["mixed"])
    assert model.dtype == mx.bfloat16
    for part in (model.base, model.aux, model.predictor):
        assert floating_dtypes(part) == {mx.bfloat16}


def test_plain_mlx_lm_directory_follows_the_policy(half_dirs, policy):
    policy("gpu")
    assert load(half_dirs["float16"] / "base").dtype == mx.float16
    policy("cpu")
    assert load(half_dirs["float16"] / "base").dtype == mx.float32


def test_quantized_model_stays_quantized_through_load_and_cast(quantized_dirs, policy):
    for device in ("gpu", "cpu"):
        policy(device)
        model = load(quantized_dirs["llama"])
        assert model.dtype == mx.float32  # the scales' dtype: the checkpoint was quantized from float32
        assert_quantized(model.base, Q_BITS)
    packed = {k: v for k, v in tree_flatten(model.base.parameters()) if v.dtype == mx.uint32}
    _cast(model.base, mx.bfloat16)
    after = dict(tree_flatten(model.base.parameters()))
    assert all(after[k].dtype == mx.uint32 and mx.array_equal(after[k], v).item() for k, v in packed.items())
    assert floating_dtypes(model.base) == {mx.bfloat16}
    assert model.base.layers[0].self_attn.q_proj.scales.dtype == mx.bfloat16
    logits = model.base(prompt(1, 7))
    assert logits.dtype == mx.bfloat16 and mx.isfinite(logits.astype(mx.float32)).all().item()
