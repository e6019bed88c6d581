"""KV-Runahead: exact distributed prefill over local ring ranks, load balancing, and
ranks that die or hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kvp_mlx.runahead.group import launch_local, write_local_hostfile
from kvp_mlx.errors import KVPError
from kvp_mlx.generation import generate
from kvp_mlx.model import load
from kvp_mlx.runahead.split import (
    CostModel, SplitTable, balanced_split, even_split, pipeline_time, single_time,
)

from decoding import decode_greedy
from conftest import VOCAB

HERE = Path(__file__).parent
REPO = HERE.parent
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
DECODE = 8


def test_splits_cover_the_prompt_and_keep_the_last_token_on_the_last_rank():
    cost = CostModel(n_layers=4, token_s=1e-6, pair_s=1e-8)
    for n in (1, 2, 3, 7, 100, 5000):
        for p in (1, 2, 3, 4, 8):
            for bounds in (even_split(n, p), balanced_split(n, p, cost)):
                assert len(bounds) == p + 1 and bounds[0] == 0 and bounds[-1] == n
                assert all(a <= b for a, b in zip(bounds, bounds[1:]))
                assert bounds[-2] < n  # the last rank holds the last token


def test_balanced_split_equalises_cost_and_beats_even():
    cost = CostModel(n_layers=16, token_s=1e-6, pair_s=2e-9)
    n, p = 8192, 4
    bounds = balanced_split(n, p, cost)
    chunks = [cost.chunk_cost(a, b) for a, b in zip(bounds, bounds[1:])]
    assert max(chunks) / min(chunks) < 1.01
    sizes = np.diff(bounds)
    assert all(sizes[:-1] > sizes[1:])  # early chunks (short prefixes) get more tokens
    assert pipeline_time(bounds, cost) < pipeline_time(even_split(n, p), cost) < single_time(n, cost)
    assert pipeline_time([0, n], cost) == pytest.approx(single_time(n, cost))
    # with a link the search never predicts worse than the even or the compute-only split
    for bandwidth in (1e6, 1e9, 1e11):
        linked = replace(cost, kv_bytes_per_token=4096.0).with_link(bandwidth, 1e-5)
        for p in (2, 3, 8):
            t = pipeline_time(balanced_split(n, p, linked), linked)
            assert t <= pipeline_time(even_split(n, p), linked)
            assert t <= pipeline_time(balanced_split(n, p, cost), linked)
            assert t <= single_time(n, linked) * (1 + 1e-9)


def test_split_table_interpolates_and_round_trips(tmp_path):
    cost = CostModel(n_layers=8, token_s=1e-6, pair_s=1e-9)
    table = SplitTable.from_cost_model(cost, ranks=[2, 4], lengths=[1024, 4096])
    assert table.split(1024, 2) == balanced_split(1024, 2, cost)
    middle = table.split(2048, 2)
    lo, hi = (table.entries[2][i][1][1] for i in (0, 1))
    assert min(lo, hi) <= middle[1] / 2048 <= max(lo, hi)
    table.save(tmp_path / "t.json")
    assert SplitTable.load(tmp_path / "t.json").split(3000, 4) == table.split(3000, 4)
    with pytest.raises(KVPError, match="no entry for 3 ranks"):
        table.split(1000, 3)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(KVPError, match="cannot read split table"):
        SplitTable.load(tmp_path / "bad.json")


def test_single_process_runahead_is_base_prefill(identity_dirs):
    model = load(identity_dirs["openelm"])
    tokens = mx.random.randint(0, VOCAB, (1, 19), key=mx.random.key(0))
    base, ra = model.prefill(tokens, method="base"), model.prefill(tokens, method="runahead")
    assert ra.info["ranks"] == 1 and ra.info["decodes"] and ra.method == "runahead"
    assert mx.array_equal(base.logits, ra.logits).item()
    assert mx.array_equal(decode_greedy(base, DECODE), decode_greedy(ra, DECODE)).item()
    with pytest.raises(KVPError, match="option 'split' of method 'runahead' must be one of balanced, even"):
        model.prefill(tokens, method="runahead", split="random")


PROMPT = "def f(x):\n    return x + 1\n" * 40


@pytest.mark.parametrize("ranks,split,step,archs", [
    (2, "balanced", 2048, ["llama", "openelm", "qwen3"]),
    (3, "even", 5, ["openelm", "llama"]),
])
def test_ranks_reproduce_base_prefill(identity_dirs, tmp_path, ranks, split, step, archs):
    """The last rank's first-token logits and greedy tokens match the base model's; with
    share_logits every rank has the logits, otherwise only the last. On 2 ranks, `kvp-mlx generate
    --method runahead` prints the base model's text on the last rank and nothing on the other."""
    argv = [sys.executable, str(HERE / "runahead_rank.py"), str(tmp_path), split, str(step), str(DECODE), "20",
            *(str(identity_dirs[a]) for a in archs)]
    env = {**ENV, "CLI_PROMPT": PROMPT} if ranks == 2 else ENV
    results = launch_local(ranks, argv, tmp_path, env=env, timeout_s=120)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank}: {r.stderr[-2000:]}"
    outs = [np.load(tmp_path / f"rank{r}.npz") for r in range(ranks)]
    sys.path.insert(0, str(HERE))
    from runahead_rank import PROMPTS, SHARED

    for i, arch in enumerate(archs):
        model = load(identity_dirs[arch])
        for index, (batch, length, seed) in enumerate(PROMPTS):
            tokens = mx.random.randint(0, VOCAB, (batch, length), key=mx.random.key(seed))
            base = model.prefill(tokens, method="base")
            key = f"m{i}_b{batch}_t{length}"
            for rank, out in enumerate(outs):
                if rank < ranks - 1 and index not in SHARED:
                    assert f"{key}_logits" not in out
                    continue
                diff = np.abs(out[f"{key}_logits"] - np.array(base.logits)).max()
                assert diff <= 1e-4, f"{arch} {key} rank {rank}: logits differ by {diff}"
            assert outs[-1][f"{key}_bounds"].tolist()[-1] == length
            assert np.array_equal(outs[-1][f"{key}_tokens"], np.array(decode_greedy(base, DECODE))), (arch, key)
            assert f"{key}_tokens" not in outs[0]  # only the last rank decodes
    if ranks == 2:
        expected = generate(load(identity_dirs[archs[0]]), PROMPT, method="base", max_tokens=6)
        first, last = ((tmp_path / f"rank{r}.cli.txt").read_text() for r in range(2))
        assert first == "exit 0\n"
        assert last.startswith("exit 0\n") and "method runahead" in last
        assert last.split("=" * 10)[1] == "\n" + expected + "\n"


def _generate_argv(model_dir: Path, *extra: str, prompt: str = PROMPT) -> list[str]:
    return [sys.executable, "-m", "kvp_mlx.cli", "generate", "--model", str(model_dir), "--prompt", prompt,
            "--max-tokens", "6", *extra]


@pytest.mark.parametrize("how", ["killed", "hangs"])
def test_survivor_exits_with_a_clear_error_when_a_rank_dies(identity_dirs, tmp_path, how):
    """Rank 0 is killed (SIGKILL) or frozen (SIGSTOP) once the prefill starts; rank 1 must exit
    non-zero with a message within 30 s: the lost connection is an error, a silent peer is
    caught by the watchdog (--runahead-timeout 8: it also bounds set-up, which a loaded 2-core
    machine can stretch past a few seconds)."""
    hostfile = write_local_hostfile(tmp_path / "hosts.json", 2)
    # a long prompt in small steps: rank 0 is still sending when it is stopped (it needs seconds)
    argv = _generate_argv(identity_dirs["openelm"], "--method", "runahead", "--runahead-timeout", "8",
                          "--prefill-step-size", "4", prompt=PROMPT * 5)  # verbose (default): ranks say when they start
    env = {**os.environ, **ENV, "MLX_HOSTFILE": str(hostfile), "OPENBLAS_NUM_THREADS": "1"}
    logs = [tmp_path / f"rank{r}.err" for r in range(2)]
    procs = [subprocess.Popen(argv, env={**env, "MLX_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=open(logs[r], "w")) for r in range(2)]
    try:
        deadline = time.monotonic() + 60
        while "starts the prefill" not in logs[0].read_text():
            assert procs[0].poll() is None and time.monotonic() < deadline, logs[0].read_text()
            time.sleep(0.02)
        procs[0].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        stopped = time.monotonic()
        code = procs[1].wait(timeout=30)
        elapsed = time.monotonic() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    err = logs[1].read_text()
    assert "error: runahead rank 1" in err, err
    if how == "killed":
        assert code == 1 and "peer rank probably exited or crashed" in err, err
    else:
        assert code == -signal.SIGTERM and "nothing happened for 8 s; a peer rank has probably died" in err, err
    assert elapsed < 30


def test_runahead_bench_measures_every_variant(identity_dirs):
    from bench.runahead import run_runahead_bench

    result = run_runahead_bench(identity_dirs["qwen3"], ranks=2, prompt_tokens=40, repeats=1, timeout_s=60)
    assert set(result.ttft_s) == {"base", "even", "balanced"}
    assert all(len(t) == 1 and t[0] > 0 for t in result.ttft_s.values())
    assert result.bounds["even"] == [0, 20, 40] and result.bounds["balanced"][-1] == 40
    assert all(t > 0 for t in result.predicted_s.values())
    assert "balanced vs even" in result.summary()


def test_missing_rank_times_out_while_joining(tmp_path):
    """Rank 0 of 2 alone: joining the ring would wait forever (MLX holds the GIL meanwhile)."""
    code = "from kvp_mlx.runahead.group import join_group; join_group(timeout_s=2)"
    (r,) = launch_local(2, [sys.executable, "-c", code], tmp_path, env=ENV, timeout_s=60, ranks=[0])
    assert r.returncode == -signal.SIGTERM, r.stderr
    assert "error: joining the distributed group" in r.stderr and "nothing happened for 2 s" in r.stderr


def test_prompt_from_a_standard_input_that_never_ends(identity_dirs, tmp_path):
    """Under mlx.launch every rank's standard input is a pipe from the launcher that is never
    closed. `--prompt -` must neither hang nor need an end of input: nothing arriving is a one-line
    error on every rank; a prompt that arrives is used (rank 0 reads it and shares it)."""
    # the timeout also bounds joining and loading: generous enough for a loaded 2-core machine
    argv = _generate_argv(identity_dirs["openelm"], "--method", "runahead", "--runahead-timeout", "8", prompt="-")
    read_end, write_end = os.pipe()
    try:
        results = launch_local(2, argv, tmp_path, env=ENV, timeout_s=90, stdin=read_end)
    finally:
        os.close(read_end)
    for r in results:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 1 and "Traceback" not in r.stderr and len(errors) == 1, (r.rank, r.stderr)
        assert "--prompt TEXT" in errors[0], errors[0]
    assert "no prompt arrived on standard input within 8 s" in results[0].stderr
    assert "rank 0 received no prompt on standard input" in results[1].stderr
    os.close(write_end)

    read_end, write_end = os.pipe()
    os.write(write_end, PROMPT.encode())  # and left open, as the launcher does
    try:
        results = launch_local(2, argv, tmp_path, env=ENV, timeout_s=120, stdin=read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    for r in results:
        assert r.returncode == 0, (r.rank, r.stderr[-2000:])
    expected = generate(load(identity_dirs["openelm"]), PROMPT, method="base", max_tokens=6)
    assert results[0].stdout == ""
    assert "method runahead" in results[1].stdout and results[1].stdout.split("=" * 10)[1] == "\n" + expected + "\n"
