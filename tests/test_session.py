"""Sessions: a multi-turn kvp session on the identity fixture is a base session is mlx-lm's own
multi-turn path; repair makes a session exact; save/load continues a conversation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from kvp_mlx.errors import KVPError
from kvp_mlx.model import load
from kvp_mlx.conversation.session import Session
from kvp_mlx.conversation.session_file import load_session, save_session

from conftest import ARCHS

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TURNS = ["Write a function that adds two numbers.", "Now make it multiply.", "Add a docstring, please."]
PER_TURN = 16


@pytest.fixture(scope="module")
def chat_identity_dirs(identity_dirs, tmp_path_factory) -> dict[str, Path]:
    """The identity fixture (aux = copy of base, identity predictor) with a chat template."""
    root = tmp_path_factory.mktemp("chat-identity")
    out = {}
    for arch, src in identity_dirs.items():
        dst = root / arch
        shutil.copytree(src, dst)
        for part in ("base", "aux"):
            path = dst / part / "tokenizer_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": CHAT_TEMPLATE}))
        out[arch] = dst
    return out


def mlx_lm_turns(model_dir: Path) -> tuple[list[list[int]], list[np.ndarray]]:
    """mlx-lm's own multi-turn path, as mlx_lm.chat runs it: one make_prompt_cache carried across
    the turns, each turn's prompt the new user message rendered with the generation prompt."""
    model, tokenizer = mlx_lm.load(str(model_dir))
    cache = make_prompt_cache(model)
    tokens, first_logprobs = [], []
    for message in TURNS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
        responses = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=PER_TURN, prompt_cache=cache))
        tokens.append([r.token for r in responses])
        first_logprobs.append(np.array(responses[0].logprobs))
    return tokens, first_logprobs


def session_turns(session: Session) -> tuple[list[list[int]], list[np.ndarray]]:
    tokens, first_logprobs = [], []
    for message in TURNS:
        responses = list(session.stream_generate(message, max_tokens=PER_TURN))
        tokens.append([r.token for r in responses])
        first_logprobs.append(np.array(responses[0].logprobs))
    return tokens, first_logprobs


@pytest.mark.parametrize("arch", ARCHS)
def test_three_turn_kvp_session_is_base_session_is_mlx_lm(chat_identity_dirs, arch):
    model_dir = chat_identity_dirs[arch]
    reference_tokens, reference_logprobs = mlx_lm_turns(model_dir / "base")
    model = load(model_dir)
    for method in ("base", "kvp"):
        session = Session(model, method=method)
        tokens, logprobs = session_turns(session)
        assert tokens == reference_tokens, f"{arch} {method}"
        for turn, (ours, ref) in enumerate(zip(logprobs, reference_logprobs)):
            diff = float(np.abs(ours - ref).max())
            assert diff <= 1e-5, f"{arch} {method} turn {turn}: next-token log-probs differ by {diff}"
        assert session.offset == len(session.tokens)
        if method == "kvp":  # every turn's new message was predicted, at its true positions
            assert len(session.predicted) == 3 and all(t.predicted for t in session.turns)
            first = session.turns[0]
            reused = first.reused_tokens + first.prefilled_tokens + first.generated_tokens
            assert session.turns[1].reused_tokens == reused


def test_warm_turn_prefills_only_the_new_message(chat_identity_dirs):
    model = load(chat_identity_dirs["llama"])
    session = Session(model, method="kvp")
    session.generate(TURNS[0], max_tokens=5)
    before = len(session.tokens)
    session.generate(TURNS[1], max_tokens=5)
    turn = session.turns[-1]
    new = model.tokenizer.apply_chat_template([{"role": "user", "content": TURNS[1]}], add_generation_prompt=True)
    assert turn.reused_tokens == before and turn.prefilled_tokens == len(new)
    assert turn.predicted == (before, before + len(new) - 1)  # the last new token runs in the base
    aux_held = session.caches.draft_cache[0].offset
    assert aux_held == before + len(new) - 1  # the auxiliary caught up on the reply too


def next_logprobs(session: Session, probe: list[int]) -> np.ndarray:
    return np.array(list(session.stream_generate(probe, max_tokens=1))[0].logprobs)


def test_repair_makes_the_demo_session_exact():
    """The trained demo model (a real, inexact predictor): after a repair the session's next-token
    log-probs equal a base session's on the same tokens, whatever mix of predicted and exact
    positions it held (a stopped and resumed repair in between)."""
    model = load()
    text = model.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)")
    session = Session(model, method="kvp", prefill_step_size=8)
    session.generate(text[:20], max_tokens=6)
    session.generate(text[20:30], max_tokens=6)
    stops = iter([False, True])  # one chunk, then stop: a partial repair
    partial = session.repair(should_stop=lambda: next(stops, True))
    assert not partial.complete and partial.positions == 8 and session.predicted
    session.generate(text[30:], max_tokens=4)  # more predicted positions after a partial repair
    predicted = session.predicted_positions()
    assert predicted > 0
    # one token: the probe turn predicts nothing, its logits come from the base over the history
    probe = model.tokenizer.encode(" x", add_special_tokens=False)[-1:]
    unrepaired = next_logprobs(_copy(session, model), probe)
    report = session.repair()
    assert report.complete and report.start == 0 and report.end == len(session.tokens) and not session.predicted
    assert report.positions == len(session.tokens) - partial.end and report.seconds > 0
    base = Session(model, method="base")
    base.prefill(list(session.tokens))
    exact = next_logprobs(base, probe)
    repaired = next_logprobs(session, probe)
    assert float(np.abs(repaired - exact).max()) <= 1e-4
    assert float(np.abs(unrepaired - exact).max()) > 1e-3  # the predicted cache really differed


def _copy(session: Session, model) -> Session:
    path = Path(f"/tmp/kvp-session-copy-{id(session)}.safetensors")
    save_session(session, path)
    try:
        return load_session(model, path)
    finally:
        path.unlink()


def test_save_load_continues_identically(chat_identity_dirs, random_pair_dir, tmp_path):
    model = load(random_pair_dir)
    ids = list(range(5, 40))
    a = Session(model, method="kvp")
    a.generate(ids[:12], max_tokens=5)
    path = save_session(a, tmp_path / "s.safetensors")
    b = load_session(model, path)
    assert b.tokens == a.tokens and b.predicted == a.predicted and b.method == "kvp"
    assert [r.token for r in a.stream_generate(ids[12:20], max_tokens=8)] == \
        [r.token for r in b.stream_generate(ids[12:20], max_tokens=8)]
    assert b.caches.draft_cache is not None and b.caches.draft_cache[0].offset == a.caches.draft_cache[0].offset
    # refused: another model, a truncated file, a corrupt file, not a session file
    other = load(chat_identity_dirs["openelm"])
    with pytest.raises(KVPError, match="was saved for another model"):
        load_session(other, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(KVPError, match="truncated or corrupt"):
        load_session(model, cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(KVPError, match="truncated or corrupt"):
        load_session(model, junk)
    plain = tmp_path / "plain.safetensors"
    mx.save_safetensors(str(plain), {"x": mx.zeros(3)})
    with pytest.raises(KVPError, match="not a kvp-mlx session file"):
        load_session(model, plain)


def test_interrupted_save_leaves_no_file(random_pair_dir, tmp_path, monkeypatch):
    import kvp_mlx.conversation.session_file as session_file

    model = load(random_pair_dir)
    session = Session(model, method="kvp")
    session.generate([5, 6, 7, 8], max_tokens=3)
    target = tmp_path / "s.safetensors"

    def broken(file_name, arrays, metadata=None):
        Path(file_name).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(session_file, "_write_file", broken)
    with pytest.raises(KeyboardInterrupt):
        save_session(session, target)
    assert list(tmp_path.iterdir()) == []


def test_trim_regenerates_and_methods_that_run_cold_are_refused(random_pair_dir):
    model = load(random_pair_dir)
    session = Session(model, method="kvp")
    first = session.generate([5, 6, 7, 8, 9], max_tokens=6)
    replies = session.turns[-1].generated_tokens
    session.trim(replies)
    assert session.generate([], max_tokens=6) == first  # the same reply again (greedy)
    with pytest.raises(KVPError, match="can trim 0 to"):
        session.trim(10**6)
    for method in ("lazy", "rp", "runahead"):
        with pytest.raises(KVPError, match=f"method '{method}' cannot extend a warm cache"):
            Session(model, method=method)


def test_fork_is_an_independent_copy_that_continues_like_the_original(random_pair_dir):
    model = load(random_pair_dir)
    session = Session(model, method="kvp")
    session.generate([5, 6, 7, 8, 9, 10], max_tokens=6)
    session.generate([11, 12, 13], max_tokens=4)
    tokens, predicted = list(session.tokens), list(session.predicted)
    whole = session.fork()
    assert whole.tokens == tokens and whole.predicted == predicted and whole.method == "kvp"
    # the copy continues as the original does, and changing it leaves the original as it was
    assert whole.generate([14, 15], max_tokens=5) == session.fork().generate([14, 15], max_tokens=5)
    assert session.tokens == tokens and session.offset == len(tokens)
    # a fork at a position inside a predicted span clips it, and its caches hold that many positions
    cut = predicted[-1][0] + 1
    part = session.fork(upto=cut)
    assert part.tokens == tokens[:cut] and part.offset == cut
    assert part.predicted == [(s, min(e, cut)) for s, e in predicted if s < cut]
    assert part.caches.draft_cache is None or part.caches.draft_cache[0].offset <= cut
    # it continues exactly as the original trimmed to the same tokens
    trimmed = session.fork()
    trimmed.trim(len(tokens) - cut)
    assert part.generate([20, 21], max_tokens=5) == trimmed.generate([20, 21], max_tokens=5)
    assert session.tokens == tokens
    with pytest.raises(KVPError, match="can fork at 0 to"):
        session.fork(upto=len(tokens) + 1)
