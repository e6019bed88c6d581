"""`kvp-mlx chat` (a REPL over a Session, idle-time repair), `kvp-mlx cache-prompt` and
`kvp-mlx generate --prompt-cache-file`: saved sessions continue exactly; bad files are refused."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvp_mlx.conversation.chat import Chat, open_session
from kvp_mlx.cli import main
from kvp_mlx.errors import KVPError
from kvp_mlx.model import load
from kvp_mlx.conversation.session import Session
from kvp_mlx.conversation.session_file import load_session, save_session

STATS = re.compile(r"^\[stats\] (.*)$", re.M)


def stats_of(stderr: str) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in (kv.split("=") for kv in m.split())} for m in STATS.findall(stderr)]


def chat_proc(model_dir: Path, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvp_mlx.cli", "chat", "--model", str(model_dir), "--max-tokens", "6",
                           *extra], input=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pair(random_pair_dir):
    return load(random_pair_dir)


def test_chat_through_a_pipe_reuses_the_cache_resets_and_exits_on_eof(random_pair_dir):
    proc = chat_proc(random_pair_dir, "hello there\nhow are you\nr\nagain\n")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    turns = stats_of(proc.stderr)
    assert len(turns) == 3, proc.stderr
    first, second, after_reset = turns
    assert first["reused"] == 0 and first["prefilled"] > 0 and first["predicted"] > 0  # kvp filled turn 1
    assert second["reused"] > 0 and second["reused"] == first["context"]  # the whole first turn reused
    assert second["reused"] + second["prefilled"] < second["context"] <= second["reused"] + second["prefilled"] + 6
    assert after_reset["reused"] == 0 and "conversation reset" in proc.stderr
    # stdout holds the conversation alone: one prompt per line read, the replies, no statistics
    assert proc.stdout.startswith(">> ") and proc.stdout.count(">> ") == 5 and "[stats]" not in proc.stdout


def test_chat_quits_on_q_and_saves_the_session(random_pair_dir, tmp_path):
    cache = tmp_path / "chat.safetensors"
    proc = chat_proc(random_pair_dir, "hello there\nq\nnever read\n", "--prompt-cache-file", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    (turn,) = stats_of(proc.stderr)
    assert cache.is_file() and "session saved" in proc.stderr
    # the next chat continues it: the saved turn is reused
    proc = chat_proc(random_pair_dir, "and then\n", "--prompt-cache-file", str(cache), "--repair", "off")
    assert proc.returncode == 0, proc.stderr
    (cont,) = stats_of(proc.stderr)
    assert cont["reused"] == turn["context"] > 0


def test_idle_repair_runs_while_waiting_and_equals_an_explicit_repair(pair):
    session = Session(pair, method="kvp")
    lines = iter(["hello there, how are you?", "tell me more about it"])
    seen: list[tuple[bool, list]] = []
    out, err = io.StringIO(), io.StringIO()

    def read_line() -> str | None:
        # the input "arrives" only once the idle repair has finished by itself
        assert chat.wait_for_repair(timeout=120)
        seen.append((chat.repairing, list(session.predicted)))
        return next(lines, None)

    chat = Chat(session, generation=dict(max_tokens=6), repair="idle", repair_step_size=4, stdout=out, stderr=err,
                read_line=read_line)
    assert chat.run() == 0
    assert seen[0] == (False, [])  # nothing predicted before the first turn: no repair started
    assert seen[1][0] and seen[1][1] == []  # after turn 1 (predicted K/V) the repair ran and left none
    assert seen[2][0] and seen[2][1] == []
    # the same conversation with explicit repairs between turns
    ref = Session(pair, method="kvp")
    first = ref.generate("hello there, how are you?", max_tokens=6)
    assert ref.predicted  # there was something to repair
    report = ref.repair()
    assert report.complete and report.positions > 0
    second = ref.generate("tell me more about it", max_tokens=6)
    assert session.tokens == ref.tokens
    assert out.getvalue() == f">> {first}\n>> {second}\n>> \n"
    assert [s.idle_repaired for s in chat.stats] == [0, report.positions]
    assert "idle_repaired=0" in err.getvalue() and "[stats]" not in out.getvalue()


def test_chat_without_idle_repair_keeps_predicted_positions(pair):
    session = Session(pair, method="kvp")
    lines = iter(["hello there", "and more"])
    chat = Chat(session, generation=dict(max_tokens=4), repair="off", stdout=io.StringIO(), stderr=io.StringIO(),
                read_line=lambda: next(lines, None))
    assert chat.run() == 0
    assert not chat.repairing and session.predicted and [s.idle_repaired for s in chat.stats] == [0, 0]


def test_a_continued_session_refuses_other_settings(pair, tmp_path):
    path = tmp_path / "s.safetensors"
    session = Session(pair, method="kvp")
    session.generate("hello", max_tokens=3)
    save_session(session, path)
    with pytest.raises(KVPError, match="--method 'kvp', not 'base'"):
        open_session(pair, path, method="base")
    resumed, loaded = open_session(pair, path, method="kvp")
    assert loaded and resumed.tokens == session.tokens


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cache_prompt_then_generate_continues_the_session(pair, random_pair_dir, tmp_path, capsys):
    path = tmp_path / "ctx.safetensors"
    prompt, question = "a long shared context about the weather", "what now?"
    assert main(["cache-prompt", "--model", str(random_pair_dir), "--prompt", prompt,
                 "--prompt-cache-file", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Processed" in out and "Peak memory" in out and path.is_file()
    saved = path.read_bytes()
    # without --model: the model named in the file
    assert main(["generate", "--prompt-cache-file", str(path), "--prompt", question, "-m", "8", "--quiet"]) == 0
    text = capsys.readouterr().out
    ref = Session(pair, method="kvp")
    ref.prefill(prompt)
    assert text == ref.generate(question, max_tokens=8) + "\n"
    assert path.read_bytes() == saved  # generate does not write the session back
    assert main(["generate", "--model", str(random_pair_dir), "--prompt-cache-file", str(path), "--prompt", question,
                 "-m", "8"]) == 0
    verbose = capsys.readouterr().out
    assert "TTFT" in verbose and text.strip() in verbose
    assert re.search(rf"Session: {ref.turns[-1].reused_tokens} tokens reused", verbose)


def test_bad_prompt_cache_files_are_refused_in_one_line(pair, identity_dirs, random_pair_dir, tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    assert main(["cache-prompt", "--model", str(random_pair_dir), "--prompt", "some context",
                 "--prompt-cache-file", str(good)]) == 0
    capsys.readouterr()
    gen = ["generate", "--model", str(random_pair_dir), "--prompt", "q", "-m", "2", "--prompt-cache-file"]

    foreign = tmp_path / "foreign.safetensors"
    other = Session(load(identity_dirs["llama"]), method="kvp")
    other.prefill("some context")
    save_session(other, foreign)
    assert "another model" in one_line_error(capsys, gen + [str(foreign)])

    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in one_line_error(capsys, gen + [str(truncated)])

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes((i * 7919 + 13) % 256 for i in range(len(data))))
    assert "truncated or corrupt" in one_line_error(capsys, gen + [str(corrupt)])

    assert "not found" in one_line_error(capsys, gen + [str(tmp_path / "missing.safetensors")])
    assert ".safetensors" in one_line_error(capsys, gen + [str(tmp_path / "good.npz")])
    assert ".safetensors" in one_line_error(capsys, ["cache-prompt", "--model", str(random_pair_dir), "--prompt", "x",
                                                     "--prompt-cache-file", str(tmp_path / "c.bin")])
    # the chat refuses them the same way, before reading any input
    assert "truncated or corrupt" in one_line_error(capsys, ["chat", "--model", str(random_pair_dir),
                                                             "--prompt-cache-file", str(truncated)])


def test_an_interrupted_save_leaves_no_partial_file(random_pair_dir, tmp_path, capsys, monkeypatch):
    import kvp_mlx.conversation.session_file as session_file

    def half_then_fail(file_name, arrays, metadata=None):
        Path(file_name).write_bytes(b"\0" * 1000)  # part of a file...
        raise OSError(28, "No space left on device")  # ...then the disk fills

    path = tmp_path / "p.safetensors"
    monkeypatch.setattr(session_file, "_write_file", half_then_fail)
    argv = ["cache-prompt", "--model", str(random_pair_dir), "--prompt", "hello", "--prompt-cache-file", str(path)]
    assert "No space left" in one_line_error(capsys, argv)
    assert os.listdir(tmp_path) == []
    # over an existing file: the old one stays whole
    monkeypatch.undo()
    assert main(argv) == 0
    before = path.read_bytes()
    monkeypatch.setattr(session_file, "_write_file", half_then_fail)
    one_line_error(capsys, argv[:-3] + ["other text", "--prompt-cache-file", str(path)])
    assert os.listdir(tmp_path) == ["p.safetensors"] and path.read_bytes() == before


def test_a_reloaded_session_continues_like_an_uninterrupted_one(pair, tmp_path):
    path = tmp_path / "s.safetensors"
    original = Session(pair, method="kvp")
    original.generate("the first message of three", max_tokens=5)
    save_session(original, path)
    reloaded = load_session(pair, path)
    assert reloaded.tokens == original.tokens and reloaded.predicted == original.predicted
    for message in ("the second one", "and the last"):
        assert reloaded.generate(message, max_tokens=5) == original.generate(message, max_tokens=5)
        assert reloaded.tokens == original.tokens and reloaded.predicted == original.predicted
