"""Progress of long prefills: the (processed, total) callback of every reporting fill, the bar's rule
(a terminal, not quiet, more than one chunk), the server's log lines, and the CLI's streams."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest

from kvp_mlx.conversation.session import Session
from kvp_mlx.generation import stream_generate
from kvp_mlx.methods import enter
from kvp_mlx.model import load
from kvp_mlx.progress import CountingBar, PrefillBar, PrefillLog, prefill_bar

PROMPT = "The quick brown fox jumps over the lazy dog, again and again."
STEP = 4  # several chunks for every prompt here


@pytest.fixture(scope="module")
def pair(random_pair_dir):
    return load(random_pair_dir)


def check_reports(reports: list[tuple[int, int]]) -> int:
    """Reports as mlx-lm's: (0, total) first, processed strictly increasing, ending at (total, total)."""
    assert len(reports) > 2, reports  # several chunks
    total = reports[0][1]
    assert reports[0] == (0, total) and reports[-1] == (total, total)
    assert all(t == total for _, t in reports)
    done = [p for p, _ in reports]
    assert done == sorted(set(done))
    return total


@pytest.mark.parametrize("method", ["base", "kvp", "aux"])
def test_generation_reports_the_fill(pair, method):
    reports: list[tuple[int, int]] = []
    kwargs = dict(method=method, max_tokens=4, prefill_step_size=STEP, use_chat_template=False)
    pieces = list(stream_generate(pair, PROMPT, prompt_progress_callback=lambda p, t: reports.append((p, t)),
                                  **kwargs))
    total = check_reports(reports)
    assert total == pieces[-1].prompt_tokens - 1  # mlx-lm's loop runs the last prompt token
    plain = list(stream_generate(pair, PROMPT, **kwargs))
    assert [p.token for p in pieces] == [p.token for p in plain]


@pytest.mark.parametrize("method", ["base", "kvp"])
def test_a_warm_turn_reports_its_new_positions(pair, method):
    session = Session(pair, method=method, prefill_step_size=STEP)
    session.generate(PROMPT, max_tokens=4, use_chat_template=False)
    reports: list[tuple[int, int]] = []
    session.generate(" and then some more words follow", max_tokens=4, use_chat_template=False,
                     prompt_progress_callback=lambda p, t: reports.append((p, t)))
    total = check_reports(reports)
    turn = session.turns[-1]
    if method == "base":
        assert total == turn.prefilled_tokens - 1
    else:  # the auxiliary also catches up on the previous reply
        assert total >= turn.prefilled_tokens - 1


def test_a_saved_prompt_reports(pair):
    reports: list[tuple[int, int]] = []
    session = Session(pair, method="kvp", prefill_step_size=STEP)
    stats = session.prefill(PROMPT, progress=lambda p, t: reports.append((p, t)))
    assert check_reports(reports) == stats.prefilled_tokens


def test_methods_that_cannot_report_do_not(pair):
    reports: list[tuple[int, int]] = []
    out = list(stream_generate(pair, PROMPT, method="rp", max_tokens=2, prefill_step_size=STEP,
                               prompt_progress_callback=lambda p, t: reports.append((p, t))))
    assert out and reports == []
    assert not enter(pair, "rp").spec.capabilities.progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_shows_only_on_a_terminal_past_one_chunk():
    assert prefill_bar(stream=io.StringIO()) is None
    assert prefill_bar(quiet=True, stream=Terminal()) is None
    one = Terminal()
    bar = prefill_bar(stream=one)
    assert isinstance(bar, PrefillBar)
    bar(0, 10)
    bar(10, 10)  # one chunk: no bar
    assert one.getvalue() == ""
    many = Terminal()
    bar = PrefillBar(many)
    for p in (0, 4, 8, 10, 0, 4, 10):  # two prefills in a row
        bar(p, 10)
    assert "prefill" in many.getvalue() and "\r" in many.getvalue()
    assert bar._bar is None  # closed at the end


def test_the_counting_bar_prints_lines_to_stdout(capsys):
    bar = CountingBar(2, "questions", stream=io.StringIO())  # not a terminal: no bar
    bar.advance("first")
    bar.advance("second")
    bar.close()
    assert capsys.readouterr().out == "first\nsecond\n"


def test_the_server_logs_long_prefills(caplog):
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        short = PrefillLog(log)
        short(0, 100)
        short(100, 100)
        assert caplog.records == []
        long = PrefillLog(log, step=0.25)
        for p in range(0, 101, 5):
            long(p, 100)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and lines[0].startswith("prefill 25/100") and "done: 100 tokens" in lines[-1]


def test_the_worker_logs_a_long_prefill(pair, caplog):
    from kvp_mlx.server.protocol import GenerationRequest
    from kvp_mlx.server.prompt_cache import SessionCache
    from kvp_mlx.server.worker import Worker

    worker = Worker(pair, SessionCache(), repair=False, prefill_step_size=STEP)
    worker.start()
    prompt = pair.tokenizer.encode(PROMPT * 2)
    with caplog.at_level(logging.INFO, logger="kvp_mlx.server"):
        job = worker.submit(GenerationRequest("text", prompt, "kvp", False, False, 2, [], False, 0, None))
        while (event := job.events.get(timeout=120))[0] not in ("done", "error"):
            pass
        worker.stop()
    assert event[0] == "done", event
    lines = [r.getMessage() for r in caplog.records if r.name == "kvp_mlx.server"]
    assert any(f"/{len(prompt) - 1} tokens" in line for line in lines), lines
    assert lines[-1].startswith(f"prefill done: {len(prompt) - 1} tokens"), lines


# --- the command line ------------------------------------------------------------------------------

LONG = "some words to fill a few prefill chunks " * 4


def generate_argv(model_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kvp_mlx.cli", "generate", "--model", str(model_dir), "--prompt", LONG,
            "--max-tokens", "3", "--prefill-step-size", "8", "--ignore-chat-template", *extra]


def test_no_bar_when_stderr_is_not_a_terminal(random_pair_dir, pair):
    proc = subprocess.run(generate_argv(random_pair_dir, "--verbose", "False"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "prefill" not in proc.stderr and "%|" not in proc.stderr
    text = "".join(p.text for p in stream_generate(pair, LONG, max_tokens=3, prefill_step_size=8,
                                                   use_chat_template=False))
    assert proc.stdout == text + "\n"


def run_with_terminal_stderr(argv: list[str]) -> tuple[int, str, str]:
    """Runs ``argv`` with a pseudo-terminal as standard error: (status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    got = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            got += chunk
        elif proc.poll() is not None:
            break
    out = proc.stdout.read() if proc.stdout else b""
    status = proc.wait(timeout=300)
    os.close(master)
    return status, out.decode(), got.decode(errors="replace")


def test_a_bar_on_a_terminal_and_none_with_quiet(random_pair_dir):
    status, out, terminal = run_with_terminal_stderr(generate_argv(random_pair_dir))
    assert status == 0, terminal
    assert "prefill" in terminal and "\r" in terminal and "tok" in terminal
    assert "prefill" not in out and "\r" not in out and "TTFT" in out
    status, out, terminal = run_with_terminal_stderr(generate_argv(random_pair_dir, "--quiet"))
    assert status == 0, terminal
    assert "prefill" not in terminal and "%|" not in terminal and "prefill" not in out
