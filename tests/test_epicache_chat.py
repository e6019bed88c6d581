"""A conversation within a KV budget: `kvp-mlx chat --kv-budget` and a Session's BoundedMemory
(turns as blocks, idle compression, episode routing), its one-line errors, and saved compressed
sessions continuing exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvp_mlx.cli import main
from kvp_mlx.epicache.cache import CompressedKVCache
from kvp_mlx.epicache.memory import BoundedMemory, ConversationMemory
from kvp_mlx.errors import KVPError
from kvp_mlx.model import load
from kvp_mlx.conversation.session import Session
from kvp_mlx.conversation.session_file import load_session, read_metadata, save_session

from test_chat_cli import stats_of

MESSAGES = ["hello there, tell me about your travels to the mountains last summer",
            "and what about your work at the office, is it going well these days",
            "my sister plays the violin every weekend with her friends in the park"]


def chat_proc(model_dir: Path, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvp_mlx.cli", "chat", "--model", str(model_dir), "--max-tokens", "6",
                           *extra], input=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pair(random_pair_dir):
    return load(random_pair_dir)


def per_head(cache: list) -> list[float]:
    """Valid entries per KV head of each compressed layer."""
    return [c.kept_entries() / c.n_heads for c in cache if isinstance(c, CompressedKVCache)]


def test_chat_with_a_kv_budget_stays_bounded_and_saves(random_pair_dir, pair, tmp_path):
    path = tmp_path / "kv.safetensors"
    budget, block = 16, 32
    proc = chat_proc(random_pair_dir, "\n".join(MESSAGES) + "\n", "--kv-budget", str(budget), "--kv-block",
                     str(block), "--kv-episodes", "2", "--prompt-cache-file", str(path))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    turns = stats_of(proc.stderr)
    assert len(turns) == 3, proc.stderr
    assert turns[-1]["context"] > 2 * (budget + block)  # the history outgrew the bound...
    for t in turns:  # ...the cache did not
        assert 0 < t["kv_entries"] <= t["kv_peak"] <= budget + block
    assert turns[1]["reused"] == turns[0]["context"] and turns[1]["kv_entries"] < turns[1]["context"]
    assert "KV budget epicache 16" in proc.stderr and "session saved" in proc.stderr
    assert proc.stdout.count(">> ") == 4 and "[stats]" not in proc.stdout
    # the saved session: compressed caches within the budget (idle compression ran after the last turn
    # only if the input had not ended; either way within budget + block), its policy recorded
    meta = read_metadata(path)
    assert meta["kv"]["policy"] == "epicache" and meta["kv"]["budget"] == budget and meta["kv"]["block"] == block
    session = load_session(pair, path)
    assert session.kv is not None and len(session.tokens) == turns[-1]["context"]
    for cache in session.kv.caches:
        assert max(per_head(cache)) <= budget + block
    # continuing it with other budget flags is refused; without them it continues
    proc = chat_proc(random_pair_dir, "and more\n", "--kv-budget", "8", "--prompt-cache-file", str(path))
    assert proc.returncode == 1 and "--kv-budget 16, not 8" in proc.stderr
    proc = chat_proc(random_pair_dir, "and more\n", "--prompt-cache-file", str(path))
    assert proc.returncode == 0, proc.stderr
    (cont,) = stats_of(proc.stderr)
    assert cont["kv_peak"] <= budget + block and cont["context"] > turns[-1]["context"]


@pytest.mark.parametrize("policy", ["epicache", "snapkv"])
def test_a_budget_above_the_conversation_is_the_plain_chat(random_pair_dir, policy):
    stdin = "\n".join(MESSAGES) + "\n"
    plain = chat_proc(random_pair_dir, stdin, "--method", "base")
    bounded = chat_proc(random_pair_dir, stdin, "--kv-budget", "4096", "--kv-block", "64", "--kv-policy", policy)
    assert plain.returncode == bounded.returncode == 0, bounded.stderr
    assert bounded.stdout == plain.stdout and len(plain.stdout) > 3 * len(">> ")
    assert [t["context"] for t in stats_of(bounded.stderr)] == [t["context"] for t in stats_of(plain.stderr)]


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("flags,message", [
    (["--kv-budget", "0"], "--kv-budget must be a positive integer, got 0"),
    (["--kv-budget", "8", "--kv-policy", "lru"], "unknown --kv-policy 'lru' (choose from epicache, streaming"),
    (["--kv-budget", "8", "--kv-policy", "full"], "unknown --kv-policy 'full'"),
    (["--kv-policy", "snapkv"], "--kv-policy needs --kv-budget"),
    (["--kv-block", "64"], "--kv-block needs --kv-budget"),
    (["--kv-budget", "8", "--kv-block", "0"], "--kv-block must be a positive integer"),
    (["--kv-budget", "8", "--kv-policy", "streaming", "--kv-episodes", "2"],
     "--kv-episodes is for --kv-policy epicache"),
    (["--kv-budget", "8", "--method", "kvp"], "runs with --method base, not kvp"),
    (["--kv-budget", "8", "--max-kv-size", "64"], "use one of them"),
    (["--kv-budget", "8", "--kv-block", "4"], "--max-tokens 256 must be below --kv-block 4"),
])
def test_bad_kv_flags_one_line(capsys, random_pair_dir, flags, message):
    assert message in one_line_error(capsys, ["chat", "--model", str(random_pair_dir), *flags])


def test_a_plain_session_file_refuses_a_budget(pair, random_pair_dir, tmp_path, capsys):
    path = tmp_path / "plain.safetensors"
    session = Session(pair, method="base")
    session.generate("hello", max_tokens=2)
    save_session(session, path)
    assert "without a KV budget" in one_line_error(capsys, ["chat", "--model", str(random_pair_dir), "--kv-budget",
                                                            "8", "--prompt-cache-file", str(path)])


def test_memory_never_exceeds_budget_plus_block(pair, monkeypatch):
    """Every append to a compressed cache is watched: a long message (over a block) is prefilled
    block by block with eviction, and idle compression brings the cache back to the budget."""
    budget, block = 8, 16
    seen: list[float] = []
    real = CompressedKVCache.update_and_fetch

    def watch(self, keys, values):
        out = real(self, keys, values)
        seen.append(self.kept_entries() / self.n_heads)
        return out

    monkeypatch.setattr(CompressedKVCache, "update_and_fetch", watch)
    session = Session(pair, kv=BoundedMemory(pair, "streaming", budget, block=block))
    messages = ["short one", "a much longer message " * 6, "and another", "one more " * 5]
    for m in messages:
        session.generate(m, max_tokens=4)
        assert session.compress().complete
        assert max(per_head(session.caches.cache)) <= budget
    assert len(session.tokens) > 4 * (budget + block) and max(seen) <= budget + block
    assert session.kv.peak_entries == max(seen)  # the peak the chat reports is the one observed
    with pytest.raises(KVPError, match="does not fit in a KV block"):
        session.generate("x", max_tokens=block)


def test_epicache_session_routes_and_catches_up(pair):
    kv = BoundedMemory(pair, "epicache", 8, block=48, n_episodes=2)
    session = Session(pair, kv=kv)
    for m in MESSAGES + ["tell me again about the mountains", "and the violin?", "the office"]:
        session.generate(m, max_tokens=4)
        assert kv.active == kv.route(m) and session.caches.cache is kv.cache  # the turn ran on its episode
        session.compress()
        held = {kv.held(c) for c in kv.caches}
        assert held == {len(session.tokens)}  # every episode's cache caught up with the conversation
    assert len(kv.caches) == 2 and kv.episodes is not None


def _continue_both(model, session: Session, path: Path, messages: list[str]) -> Session:
    save_session(session, path)
    reloaded = load_session(model, path)
    assert reloaded.tokens == session.tokens
    for m in messages:
        assert reloaded.generate(m, max_tokens=5) == session.generate(m, max_tokens=5)
        assert reloaded.tokens == session.tokens
        if session.kv is not None:
            session.compress()
            reloaded.compress()
    return reloaded


@pytest.mark.parametrize("policy", ["epicache", "snapkv", "streaming", "full"])
def test_compressed_session_round_trips_exactly(identity_dirs, tmp_path, policy):
    model = load(identity_dirs["llama"])
    history = model.tokenizer.encode(" ".join(MESSAGES * 2))
    windows = [f'User said, "{m}"\n' for m in MESSAGES]
    memory = ConversationMemory(model, history, policy, None if policy == "full" else 12, block=24,
                                windows=windows, n_episodes=2, n_medoids=1)
    session = memory.session(MESSAGES[0])
    assert any(isinstance(c, CompressedKVCache) for c in session.caches.cache)
    path = tmp_path / f"{policy}.safetensors"
    reloaded = _continue_both(model, session, path, ["what about the violin?", "and the office"])
    meta = read_metadata(path)
    if policy == "full":
        assert meta["kv"] is None and reloaded.kv is None
    else:
        assert meta["kv"]["policy"] == policy and meta["kv"]["budget"] == 12 and meta["kv"]["block"] == 24
        assert reloaded.kv is not None and len(reloaded.kv.caches) == len(session.kv.caches)
    # a fresh model object (its attention not yet taught compressed masks) loads it too
    fresh = load(identity_dirs["llama"])
    again = load_session(fresh, path)
    plain = load_session(model, path)
    assert again.generate("one more", max_tokens=5) == plain.generate("one more", max_tokens=5)
    with pytest.raises(KVPError, match="another model"):
        load_session(load(identity_dirs["qwen3"]), path)


def test_chat_session_with_episodes_round_trips(pair, tmp_path):
    session = Session(pair, kv=BoundedMemory(pair, "epicache", 8, block=48, n_episodes=2))
    for m in MESSAGES * 2:
        session.generate(m, max_tokens=4)
        session.compress()
    assert session.kv is not None and len(session.kv.caches) == 2
    reloaded = _continue_both(pair, session, tmp_path / "episodes.safetensors", ["the mountains", "the violin"])
    assert reloaded.kv is not None and reloaded.kv.active == session.kv.active
