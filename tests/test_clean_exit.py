"""The process exits promptly after its last output, even with MLX work still queued (issue 25, item 3).

MLX never joins its CPU stream threads; an op still queued there at exit (mlx-lm evaluates one token
ahead) used to be inside a threaded OpenBLAS sgemm when OpenBLAS's destructor joined its thread pool,
which then hung forever at 0% CPU (see ``kvp_mlx._blas._quiesce_at_exit``).
"""

from __future__ import annotations

import os
import random
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvp_mlx import _blas
from kvp_mlx import testing as mb

REPO = Path(__file__).resolve().parents[1]
EXIT_WITHIN_S = 10.0  # after the last byte of output
PROMPT_TOKENS = 30_000

needs_openblas = pytest.mark.skipif(_blas.loaded_blas is None, reason="no OpenBLAS loaded (the hang is OpenBLAS's)")

# Queue ~200 threaded sgemms on MLX's CPU stream, then exit while they run (hung 14 of 20 runs before the fix).
IN_FLIGHT_AT_EXIT = """
import kvp_mlx, mlx.core as mx
a = mx.random.normal((512, 512)); mx.eval(a)
x = a
for _ in range(200):
    x = (x @ a) * (1.0 / 512)
mx.async_eval(x)
print("exiting", flush=True)
"""


def run_timed(args: list[str], done: bytes, stdin: bytes = b"", hard_timeout_s: float = 240.0,
              ) -> tuple[int, bytes, float]:
    """Run ``args``; return (exit status, stdout + stderr, seconds from the last output byte to exit).

    Fails (killing the process) when it is still alive EXIT_WITHIN_S after its last byte of output
    once ``done`` (its final report) has appeared, or after ``hard_timeout_s`` in all (a slow prefill
    prints nothing for a while, which is not the hang).
    """
    proc = subprocess.Popen(args, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    sel = selectors.DefaultSelector()
    for pipe in (proc.stdout, proc.stderr):
        os.set_blocking(pipe.fileno(), False)
        sel.register(pipe, selectors.EVENT_READ)
    output = bytearray()
    start = last_byte = time.monotonic()
    try:
        while sel.get_map():  # both pipes close only when the process (every thread of it) has exited
            now = time.monotonic()
            if (done in output and now - last_byte > EXIT_WITHIN_S) or now - start > hard_timeout_s:
                proc.kill()
                proc.wait()
                pytest.fail(f"{args[1:4]}: still running {now - last_byte:.0f} s after its last output "
                            f"({now - start:.0f} s in all); output tail:\n{output[-2000:].decode(errors='replace')}")
            for key, _ in sel.select(timeout=0.5):
                chunk = key.fileobj.read(65536)  # type: ignore[union-attr]
                if chunk:
                    output += chunk
                    last_byte = time.monotonic()
                elif chunk == b"":
                    sel.unregister(key.fileobj)
        status = proc.wait(timeout=max(1.0, EXIT_WITHIN_S - (time.monotonic() - last_byte)))
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, bytes(output), time.monotonic() - last_byte


@needs_openblas
def test_exit_with_blas_work_in_flight():
    for _ in range(5):
        status, out, lag = run_timed([sys.executable, "-c", IN_FLIGHT_AT_EXIT], done=b"exiting")
        assert status == 0, out.decode(errors="replace")
        assert lag < EXIT_WITHIN_S


@pytest.fixture(scope="module")
def long_prompt_pair(tmp_path_factory) -> tuple[Path, bytes]:
    """A small random-weight KV Prediction pair and a prompt of about PROMPT_TOKENS tokens for it."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("clean_exit")
    tok = mb.build_byte_tokenizer(root / "tok", mb.default_tokenizer_texts(), 512)
    base_cfg = mb.tiny_config("openelm", n_layers=2, vocab_size=512)
    aux_cfg = mb.tiny_config("openelm", n_layers=1, vocab_size=512)
    aux_cfg.update(model_dim=32, num_query_heads=[2], num_kv_heads=[1])
    base, aux = mb.build_model(base_cfg, seed=1), mb.build_model(aux_cfg, seed=2)
    pred = mb.make_predictor(base, aux, init="random", seed=3)
    pair = mb.save_kvp_dir(root / "pair", base, base_cfg, aux, aux_cfg, pred, tok, "clean-exit pair", True)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(2000)]
    tokenizer = AutoTokenizer.from_pretrained(str(pair / "base"))
    text = " ".join(rng.choice(words) for _ in range(6000))
    n = len(tokenizer.encode(text))
    text = text[: int(len(text) * PROMPT_TOKENS / n)]  # about 0.85 tokens a character
    assert abs(len(tokenizer.encode(text)) - PROMPT_TOKENS) < 0.02 * PROMPT_TOKENS
    return pair, text.encode()


@needs_openblas
def test_generate_long_prompt_exits_promptly(long_prompt_pair):
    pair, prompt = long_prompt_pair
    for _ in range(5):
        status, out, lag = run_timed([sys.executable, "-m", "kvp_mlx.cli", "generate", "--model", str(pair),
                                      "-p", "-", "-m", "5"], done=b"TTFT", stdin=prompt)
        assert status == 0, out.decode(errors="replace")
        assert b"TTFT" in out and lag < EXIT_WITHIN_S
