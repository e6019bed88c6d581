"""`kvp-mlx chat` in a pseudo-terminal, interrupted: SIGINT at 20 points (before a reply's first
token, in the middle of a reply, during the idle repair, during the save), SIGTERM and SIGHUP.
After each chat the saved file loads, holds every completed turn and nothing else, and continues
as a base session that was never interrupted does (the identity fixture: kvp == base exactly).

Timing without sleeps: a point is reached by watching the chat (its output, and its CPU time in
/proc: an idle chat uses none, so CPU time going up after a message means the turn is computing,
after a statistics line that the idle repair is) and the signal is sent then. A long message
prefilled in small steps keeps the turn before its first token long enough to be caught; a reply
of many tokens keeps it mid-reply. The save is announced ("saving the session") before it starts,
and the signal sent on seeing that lands while the file is written or, on a fast disk, just after
(while the chat exits): the save is short and this is the one point not pinned down exactly. The
chat holds signals while it saves, so either way the file is whole. About 35 s on two CPU cores.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import termios
import time
from pathlib import Path

import pytest

from kvp_mlx.conversation.session import Session
from kvp_mlx.conversation.session_file import load_session
from kvp_mlx.model import load

if not sys.platform.startswith("linux"):
    pytest.skip("reads the chat's CPU time from /proc", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 200
LONG = " ".join(f"word{i} of a long pasted document" for i in range(40))  # ~1300 characters


class PtyChat:
    """A `kvp-mlx chat` process on a pseudo-terminal (echo off; stdout and stderr both read here)."""

    def __init__(self, model_dir: Path, cache: Path, *extra: str) -> None:
        argv = [sys.executable, "-m", "kvp_mlx.cli", "chat", "--model", str(model_dir), "--prompt-cache-file",
                str(cache), "--max-tokens", str(MAX_TOKENS), "--prefill-step-size", "8", *extra]
        pid, fd = pty.fork()
        if pid == 0:  # the child: the chat
            os.chdir(ROOT)
            os.execv(sys.executable, argv)
        self.pid, self.fd, self.out = pid, fd, ""
        self.status: int | None = None
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the child has gone
            return False
        self.out += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return bool(data)

    def expect(self, pattern: str, start: int = 0, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.out, start)
            if m:
                return m
            if time.monotonic() > deadline or (not self._read(0.05) and self.exited()):
                raise AssertionError(f"no {pattern!r} in the chat's output:\n{self.out[-3000:]}")

    def send(self, line: str) -> int:
        os.write(self.fd, (line + "\n").encode())
        return len(self.out)

    def cpu(self) -> int:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks

    def wait_busy(self, since: int, ticks: int = 3, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.cpu() < since + ticks:
            self._read(0.002)
            assert time.monotonic() < deadline, "the chat never got busy"

    def kill(self, signum: int) -> int:
        os.kill(self.pid, signum)
        return len(self.out)

    def exited(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status is not None

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while not self.exited():
            self._read(0.05)
            assert time.monotonic() < deadline, f"the chat did not end:\n{self.out[-3000:]}"
        while self._read(0.05):
            pass
        os.close(self.fd)
        assert self.status is not None
        return self.status


class Reference:
    """A base session given only the completed turns: what the saved file must hold."""

    def __init__(self, model) -> None:
        self.model, self.session = model, Session(model, method="base")

    def turn(self, message: str) -> None:
        self.session.generate(message, max_tokens=MAX_TOKENS)

    def check(self, path: Path) -> None:
        loaded = load_session(self.model, path)
        assert loaded.tokens == self.session.tokens
        probe = "and how does it end?"
        assert loaded.generate(probe, max_tokens=12) == self.session.fork().generate(probe, max_tokens=12)


@pytest.fixture(scope="module")
def identity_dir(identity_dirs):
    return identity_dirs["llama"]


def complete_turn(chat: PtyChat, ref: Reference, message: str) -> None:
    start = chat.send(message)
    chat.expect(r"\[stats\] ", start)
    ref.turn(message)


def test_sigint_at_twenty_points_loses_nothing(identity_dir, tmp_path):
    model = load(identity_dir)
    ref = Reference(model)
    cache = tmp_path / "chat.safetensors"
    chat = PtyChat(identity_dir, cache, "--repair", "off")
    chat.expect(r">> ")
    complete_turn(chat, ref, "hello there")
    hits = {"before the first token": 0, "mid-reply": 0, "during the repair": 0, "during the save": 0}
    for i in range(5):
        # before the first token: the long message is being prefilled (CPU busy, nothing printed)
        chat.expect(r">> $", 0)
        idle = chat.cpu()
        start = chat.send(f"{LONG} ({i})")
        chat.wait_busy(idle)
        chat.kill(signal.SIGINT)
        m = chat.expect(r"\[chat\] reply interrupted: the turn was not kept\n", start)
        if chat.out[start : m.start()].strip() == "":
            hits["before the first token"] += 1
        # mid-reply: some of the reply is on the screen
        chat.expect(r">> $", m.end())
        start = chat.send(f"tell me a long story, number {i}")
        chat.expect(r"\S", start)
        chat.kill(signal.SIGINT)
        m = chat.expect(r"\[chat\] reply interrupted|\[stats\] ", start)
        if m.group(0).startswith("[chat]"):
            hits["mid-reply"] += 1
        else:  # the reply ended before the signal: a completed turn
            ref.turn(f"tell me a long story, number {i}")
        complete_turn(chat, ref, f"short message {i}")  # the chat goes on as if nothing happened
    start = chat.send("q")
    assert chat.wait() == 0
    assert "session saved" in chat.out[start:] and "Traceback" not in chat.out
    ref.check(cache)

    for i in range(5):
        # the idle repair of the continued session, then the save it starts
        chat = PtyChat(identity_dir, cache, "--repair", "idle", "--repair-step-size", "1")
        # a long message: its many predicted positions keep the idle repair (a position a step) busy
        complete_turn(chat, ref, f"{LONG} (more {i})")
        m = chat.expect(r">> $", chat.expect(r"\[stats\] [^\n]*\n").end())
        chat.wait_busy(chat.cpu())
        chat.kill(signal.SIGINT)
        saving = chat.expect(r"\[chat\] saving the session", m.end())
        chat.kill(signal.SIGINT)
        saved = chat.expect(r"session saved to \S+ \((\d+) tokens(?:, repaired (\d+) positions of (\d+))?\)",
                            saving.end())
        assert chat.wait() == 0, chat.out[-2000:]
        assert "Traceback" not in chat.out
        if saved.group(2) is not None and 0 < int(saved.group(2)) < int(saved.group(3)):
            hits["during the repair"] += 1
        hits["during the save"] += 1  # sent once the save had begun (see the module's note)
        ref.check(cache)
    assert hits["before the first token"] >= 4 and hits["mid-reply"] >= 4, hits
    assert hits["during the repair"] >= 4 and hits["during the save"] == 5, hits


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_the_conversation(identity_dir, tmp_path, signum):
    model = load(identity_dir)
    ref = Reference(model)
    cache = tmp_path / "chat.safetensors"
    chat = PtyChat(identity_dir, cache, "--repair", "off")
    chat.expect(r">> ")
    complete_turn(chat, ref, "hello there")
    if signum == signal.SIGTERM:  # in the middle of a reply: that turn is rolled back
        start = chat.send("tell me a long story")
        chat.expect(r"\S", start)
    else:  # the terminal closed while the chat waits
        chat.expect(r">> $")
    chat.kill(signum)
    assert chat.wait() == 128 + signum
    assert "session saved" in chat.out and "Traceback" not in chat.out
    ref.check(cache)
