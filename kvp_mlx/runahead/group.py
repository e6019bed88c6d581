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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx

from kvp_mlx.errors import KVPError

DEFAULT_TIMEOUT_S = 120.0

# The watchdog runs as a small child process: MLX holds the GIL in some blocking calls (joining a
# ring does), so a thread in the rank itself could not act. Protocol on its stdin, one line each:
# "arm SECONDS MESSAGE" or "disarm"; end of input (the rank exited) ends it.
_WATCHDOG_PROGRAM = r"""
import os, select, signal, sys, time
parent, deadline, message, buffer = int(sys.argv[1]), None, "", b""
while True:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    if select.select([0], [], [], wait)[0]:
        data = os.read(0, 65536)
        if not data:
            sys.exit(0)
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            command, _, rest = line.decode().partition(" ")
            if command == "arm":
                seconds, _, message = rest.partition(" ")
                deadline = time.monotonic() + float(seconds)
            else:
                deadline = None
    elif deadline is not None:
        os.write(2, (message + "\n").encode())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(parent, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        sys.exit(0)
"""


class Watchdog:
    """Terminates this process (SIGTERM, then SIGKILL) with a one-line ``error:`` message on stderr
    when a guarded wait outlasts its timeout. Started on first use."""

    def __init__(self) -> None:
        self._child: subprocess.Popen | None = None

    def _send(self, line: str) -> None:
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG_PROGRAM, str(os.getpid())],
                                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        assert self._child.stdin is not None  # stdin=PIPE
        try:
            self._child.stdin.write(line.replace("\n", " ").encode() + b"\n")
            self._child.stdin.flush()
        except BrokenPipeError:
            self._child = None

    @contextlib.contextmanager
    def guard(
        self, what: str, timeout_s: float, cause: str = "a peer rank has probably died or hangs"
    ) -> Iterator[None]:
        self._send(f"arm {timeout_s} error: {what}: nothing happened for {timeout_s:g} s; {cause} "
                   "(terminating this rank)")
        try:
            yield
        finally:
            self._send("disarm")


watchdog = Watchdog()


@contextlib.contextmanager
def guarded(what: str, timeout_s: float) -> Iterator[None]:
    """A blocking distributed step: bounded by the watchdog; a lost peer becomes a KVPError."""
    with watchdog.guard(what, timeout_s):
        try:
            yield
        except RuntimeError as e:  # MLX reports a lost peer as RuntimeError ("[ring] connection ... lost")
            raise KVPError(f"{what} failed: {e} (a peer rank probably exited or crashed)") from None


# Set by the launchers that start ranks: mlx.launch (ring, jaccl) and MPI implementations.
LAUNCH_VARIABLES = ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def launched_as_ranks() -> bool:
    """True when this process was started as one rank of a distributed launch."""
    return any(name in os.environ for name in LAUNCH_VARIABLES)


def share_text(group: mx.distributed.Group, text: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> str | None:
    """Rank 0's ``text`` on every rank (the others' ``text`` is ignored); None everywhere when rank 0 has none.

    The other ranks wait for rank 0 under the watchdog, ``timeout_s`` at most.
    """
    if group.size() == 1:
        return text
    first = group.rank() == 0
    data = text.encode("utf-8") if first and text is not None else b""
    length = (len(data) if text is not None else -1) if first else 0
    with guarded(f"rank {group.rank()}: waiting for rank 0 to share the prompt", timeout_s):
        total = int(mx.distributed.all_sum(mx.array([length], dtype=mx.int32), group=group).item())  # type: ignore[arg-type]  # an int32 scalar
        if total <= 0:
            return None if total < 0 else ""
        mine = mx.array(list(data), dtype=mx.int32) if first else mx.zeros((total,), dtype=mx.int32)
        shared = mx.distributed.all_sum(mine, group=group)
        mx.eval(shared)
    return bytes(shared.tolist()).decode("utf-8")  # type: ignore[arg-type]  # a 1-D int32 array: list[int]


def join_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> mx.distributed.Group:
    """The global group (size 1 when not launched as several ranks); waits at most ``timeout_s``."""
    if not mx.distributed.is_available() or "MLX_HOSTFILE" not in os.environ:
        return mx.distributed.init()  # alone, or MPI (which mpirun starts together): no wait
    with guarded("joining the distributed group (waiting for every rank to start)", timeout_s):
        return mx.distributed.init()


def barrier(group: mx.distributed.Group, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Wait until every rank of ``group`` reaches this point."""
    if group.size() > 1:
        with guarded(f"rank {group.rank()}: waiting for the other ranks", timeout_s):
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


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
    stdin: int | None = None,
) -> list[RankResult]:
    """Run ``argv`` as ``n`` ranks of a local ring (``MLX_HOSTFILE`` + ``MLX_RANK``) and wait.

    ``ranks`` starts only some of them (tests use it to leave a rank missing). The BLAS threads are
    split between the ranks (``OPENBLAS_NUM_THREADS``) unless ``env`` sets them. Ranks still running
    after ``timeout_s`` are killed (return code -9). ``stdin`` (a file descriptor) is every rank's
    standard input, as mlx.launch gives each rank a pipe of its own input; by default they inherit ours.
    """
    hostfile = write_local_hostfile(Path(workdir) / "hosts.json", n)
    threads = max(1, (os.cpu_count() or 1) // n)
    base_env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), **(env or {}), "MLX_HOSTFILE": str(hostfile)}
    procs = []
    for rank in ranks if ranks is not None else range(n):
        out = open(Path(workdir) / f"rank{rank}.out", "w+")
        err = open(Path(workdir) / f"rank{rank}.err", "w+")
        p = subprocess.Popen(list(argv), env={**base_env, "MLX_RANK": str(rank)}, stdin=stdin, stdout=out, stderr=err)
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
