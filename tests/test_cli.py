"""The generate and env commands, and loading through the Hugging Face cache offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from kvp_mlx import _blas
from kvp_mlx.errors import KVPError
from kvp_mlx.generation import generate, stream_generate
from kvp_mlx.model import load


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvp_mlx.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_generate_streams_and_reports_ttft(random_pair_dir):
    proc = cli("generate", "--model", str(random_pair_dir), "--prompt", "hello", "--max-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert "TTFT" in proc.stdout and "method kvp" in proc.stdout
    assert "Prompt:" in proc.stdout and "tokens-per-sec" in proc.stdout and "Peak memory" in proc.stdout
    assert "RANDOM weights" in proc.stderr


def test_generate_compare(random_pair_dir):
    proc = cli("generate", "--model", str(random_pair_dir), "--prompt", "def f(x):", "--max-tokens", "3",
               "--compare")
    assert proc.returncode == 0, proc.stderr
    assert "TTFT base" in proc.stdout and "first tokens agree:" in proc.stdout


def test_env_reports_blas():
    proc = cli("env")
    assert proc.returncode == 0
    assert "blas" in proc.stdout and "dtype policy" in proc.stdout and "mlx" in proc.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux BLAS loader")
def test_optimized_blas_loaded_when_installed():
    expected = _blas._find_openblas()
    if expected is None:
        pytest.skip("no OpenBLAS on this machine (make setup installs it)")
    assert _blas.loaded_blas == expected


def test_stream_generate_api(random_pair_dir):
    model = load(random_pair_dir)
    pieces = list(stream_generate(model, "hello there", max_tokens=6, method="kvp"))
    assert 1 <= len(pieces) <= 6
    assert pieces[-1].finish_reason in ("stop", "length")
    assert pieces[0].ttft_s > 0 and pieces[0].prompt_tokens >= 2
    # Greedy decoding is deterministic; sampling with a seed is reproducible.
    assert generate(model, "hello there", max_tokens=6) == "".join(p.text for p in pieces)
    a = generate(model, "hello", max_tokens=8, temp=1.0, top_p=0.9, seed=4)
    b = generate(model, "hello", max_tokens=8, temp=1.0, top_p=0.9, seed=4)
    assert a == b
    with pytest.raises(KVPError):
        generate(model, "", max_tokens=3)


def test_load_from_hf_cache_offline(random_pair_dir, tmp_path):
    """A repo id resolves through huggingface-hub's cache with HF_HUB_OFFLINE=1 (no network)."""
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-kvp" / "snapshots" / "0123456789abcdef"
    shutil.copytree(random_pair_dir, snap)
    (cache / "models--someone--tiny-kvp" / "refs").mkdir()
    (cache / "models--someone--tiny-kvp" / "refs" / "main").write_text("0123456789abcdef")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    proc = cli("generate", "--model", "someone/tiny-kvp", "--prompt", "hello", "--max-tokens", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    missing = cli("generate", "--model", "someone/absent", "--prompt", "hello", env=env)
    assert missing.returncode == 1 and "HF_HUB_OFFLINE" in missing.stderr and "Traceback" not in missing.stderr


def test_package_exports_the_api(random_pair_dir):
    import kvp_mlx

    model = kvp_mlx.load(random_pair_dir)
    assert isinstance(model, kvp_mlx.KVPModel)
    for _ in range(2):  # the second access must still be the function, not a submodule
        assert callable(kvp_mlx.generate) and callable(kvp_mlx.stream_generate)
    assert isinstance(kvp_mlx.generate(model, "hi", max_tokens=2), str)


def test_embedded_demo_model_runs_offline():
    """No --model: the trained toy-world KVP-C model shipped in the package generates, offline."""
    proc = cli("generate", "--prompt", "def add(a, b):", "--max-tokens", "12", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.split("=" * 10)[1]
    assert text.strip(), "the demo model produced no continuation"
    assert "TTFT" in proc.stdout and "RANDOM" not in proc.stderr
