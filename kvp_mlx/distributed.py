"""Process groups for distributed prefill: joining an ``mx.distributed`` group with a deadline, a
watchdog around blocking sends and receives, and launching N local ranks (a ring on 127.0.0.1).

``mx.distributed`` calls can block forever: joining a ring waits for every rank to show up, and a
receive from a peer that hangs (alive, sockets open, never sending) never returns. A peer that
exits closes its sockets and MLX raises ``RuntimeError`` (turned into a :class:`KVPError` here);
the watchdog covers the hanging case by ending the process with a message after a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx

from kvp_mlx.errors import KVPError

DEFAULT_TIMEOUT_S = 120.0
WATCHDOG_EXIT_CODE = 3


class Watchdog:
    """Ends the process (exit code 3, one line on stderr) when a guarded wait outlasts its timeout.

    ``os._exit`` is the only way out of a C++ receive that never returns; it skips cleanup, which
    is acceptable for a rank whose peers are gone.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._what = ""
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def guard(self, what: str, timeout_s: float) -> Iterator[None]:
        with self._lock:
            self._deadline, self._what = time.monotonic() + timeout_s, what
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="kvp-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
            if expired:
                os.write(2, f"error: {what}: no progress before the timeout; a peer rank has probably "
                            "died or hangs (exiting)\n".encode())
                os._exit(WATCHDOG_EXIT_CODE)


watchdog = Watchdog()


@contextlib.contextmanager
def guarded(what: str, timeout_s: float) -> Iterator[None]:
    """A blocking distributed step: bounded by the watchdog; a lost peer becomes a KVPError."""
    with watchdog.guard(f"{what} (timeout {timeout_s:g} s)", timeout_s):
        try:
            yield
        except RuntimeError as e:  # MLX reports a lost peer as RuntimeError ("[ring] connection ... lost")
            raise KVPError(f"{what} failed: {e} (a peer rank probably exited or crashed)") from None


def join_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> mx.distributed.Group:
    """The global group (size 1 when not launched as several ranks); waits at most ``timeout_s``."""
    if not mx.distributed.is_available():
        return mx.distributed.init()
    with guarded("joining the distributed group (waiting for every rank to start)", timeout_s):
        return mx.distributed.init()


def free_local_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_local_hostfile(path: str | Path, n: int) -> Path:
    """An MLX ring hostfile for ``n`` ranks on this machine: ``[["127.0.0.1:PORT"], ...]``."""
    path = Path(path)
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_local_ports(n)]))
    return path


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def launch_local(
    n: int,
    argv: Sequence[str],
    workdir: str | Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 600.0,
    ranks: Sequence[int] | None = None,
) -> list[RankResult]:
    """Run ``argv`` as ``n`` ranks of a local ring (``MLX_HOSTFILE`` + ``MLX_RANK``) and wait.

    ``ranks`` starts only some of them (tests use it to leave a rank missing). The BLAS threads are
    split between the ranks (``OPENBLAS_NUM_THREADS``) unless ``env`` sets them. Ranks still running
    after ``timeout_s`` are killed (return code -9).
    """
    hostfile = write_local_hostfile(Path(workdir) / "hosts.json", n)
    threads = max(1, (os.cpu_count() or 1) // n)
    base_env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), **(env or {}), "MLX_HOSTFILE": str(hostfile)}
    procs = []
    for rank in ranks if ranks is not None else range(n):
        out = open(Path(workdir) / f"rank{rank}.out", "w+")
        err = open(Path(workdir) / f"rank{rank}.err", "w+")
        p = subprocess.Popen(list(argv), env={**base_env, "MLX_RANK": str(rank)}, stdout=out, stderr=err)
        procs.append((rank, p, out, err))
    deadline = time.monotonic() + timeout_s
    results = []
    for rank, p, out, err in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        out.seek(0)
        err.seek(0)
        results.append(RankResult(rank, p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results


def python_module_argv(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]
