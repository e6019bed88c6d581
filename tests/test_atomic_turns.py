"""Atomic turns: whatever stops a session's operation (an exception from a logits processor, a
KeyboardInterrupt inside the sampler or the model, a stream thrown into), the session is exactly as
before it, and its next turn gives the tokens of a session that was never interrupted. Session
files carry a checksum; the smaller messages of a bad file are ours."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from kvp_mlx import sampling
from kvp_mlx.conversation.session import Session
from kvp_mlx.conversation.session_file import load_session, save_session
from kvp_mlx.errors import KVPError
from kvp_mlx.model import load

FIRST, SECOND, THIRD = [5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18]


@pytest.fixture(scope="module")
def identity(identity_dirs):
    return load(identity_dirs["llama"])


def state_of(session: Session) -> tuple:
    """Everything a turn may change, with the caches' contents up to what they hold."""
    def contents(cache):
        if cache is None:
            return None
        return [(c.offset, np.array(c.keys[..., : c.offset, :]), np.array(c.values[..., : c.offset, :]))
                for c in cache]

    repair = session._repair
    return (list(session.tokens), list(session.predicted), len(session.turns), session.offset,
            contents(session.caches.cache), contents(session.caches.draft_cache),
            None if repair is None else (repair.start, repair.position, contents(repair.cache)))


def assert_same_state(a: tuple, b: tuple) -> None:
    assert a[:4] == b[:4]
    for x, y in zip(a[4:], b[4:]):
        assert repr(type(x)) == repr(type(y))
        if x is None:
            continue
        flat_x = x if isinstance(x, list) else x[2]
        flat_y = y if isinstance(y, list) else y[2]
        if not isinstance(x, list):
            assert x[:2] == y[:2]
        assert len(flat_x) == len(flat_y)
        for (ox, kx, vx), (oy, ky, vy) in zip(flat_x, flat_y):
            assert ox == oy and np.array_equal(kx, ky) and np.array_equal(vx, vy)


def two_turns(model, method: str = "kvp") -> Session:
    session = Session(model, method=method)
    session.generate(FIRST, max_tokens=6)
    session.generate(SECOND, max_tokens=5)
    return session


def reference_third(model) -> list[int]:
    """The third turn's tokens in a session that was never interrupted (the base model's)."""
    return [r.token for r in two_turns(model, "base").stream_generate(THIRD, max_tokens=6)]


class Boom(Exception):
    pass


def raising_at(k: int, error: BaseException):
    calls = {"n": 0}

    def maybe_raise() -> None:
        calls["n"] += 1
        if calls["n"] == k:
            raise error

    return maybe_raise


@pytest.mark.parametrize("where,k,error", [
    ("processor", 1, Boom("first token")),  # before the first token is out
    ("processor", 4, Boom("mid-reply")),
    ("sampler", 1, KeyboardInterrupt()),
    ("sampler", 3, KeyboardInterrupt()),
])
def test_a_turn_stopped_inside_the_token_loop_leaves_the_session_as_it_was(identity, monkeypatch, where, k, error):
    session = two_turns(identity)
    session.repair(should_stop=iter([False, True]).__next__, prefill_step_size=4)  # a repair in progress too
    before = state_of(session)
    trigger = raising_at(k, error)
    if where == "processor":
        monkeypatch.setattr(sampling.SamplingOptions, "logits_processors",
                            lambda self: [lambda tokens, logits: (trigger(), logits)[1]])
    else:
        make = sampling.SamplingOptions.sampler

        def sampler(self, special):
            inner = make(self, special)
            return lambda logprobs: (trigger(), inner(logprobs))[1]

        monkeypatch.setattr(sampling.SamplingOptions, "sampler", sampler)
    with pytest.raises(type(error)):
        for _ in session.stream_generate(THIRD, max_tokens=6):
            pass
    monkeypatch.undo()
    assert_same_state(state_of(session), before)
    assert [r.token for r in session.stream_generate(THIRD, max_tokens=6)] == reference_third(identity)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), Boom("a client went away"), GeneratorExit()])
def test_an_exception_thrown_into_the_stream_rolls_the_turn_back_and_close_keeps_the_reply(identity, error):
    session = two_turns(identity)
    before = state_of(session)
    steps = session.stream_generate(THIRD, max_tokens=6)
    next(steps), next(steps)
    if isinstance(error, GeneratorExit):  # close(): the two tokens so far are a shorter, consistent reply
        steps.close()
        session.verify()
        assert session.tokens[: len(before[0])] == before[0] and len(session.turns) == before[2] + 1
        assert session.tokens[-2:] == reference_third(identity)[:2]
        return
    with pytest.raises(type(error)):
        steps.throw(error)
    assert_same_state(state_of(session), before)
    assert [r.token for r in session.stream_generate(THIRD, max_tokens=6)] == reference_third(identity)


def fail_predictor(monkeypatch, model, error: BaseException) -> None:
    """The predictor raises: the auxiliary has already written its cache this turn."""
    monkeypatch.setattr(type(model.predictor), "__call__", lambda self, *a, **k: (_ for _ in ()).throw(error))


@pytest.mark.parametrize("operation", ["prefill", "score", "repair"])
def test_prefill_score_and_repair_stopped_midway_leave_the_session_as_it_was(identity, monkeypatch, operation):
    session = two_turns(identity)
    before = state_of(session)
    if operation == "repair":
        base_call = type(identity.base).__call__
        trigger = raising_at(2, KeyboardInterrupt())
        monkeypatch.setattr(type(identity.base), "__call__",
                            lambda self, *a, **k: (trigger(), base_call(self, *a, **k))[1])
        with pytest.raises(KeyboardInterrupt):
            session.repair(prefill_step_size=4)
        monkeypatch.undo()
        # the chunk in flight is undone, the finished one kept: the repair resumes where it stopped
        assert session._repair is not None and session._repair.position == 4 and session.offset == before[3]
        assert session.tokens == before[0] and session.predicted == before[1]
        session.repair()
    else:
        fail_predictor(monkeypatch, identity, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            if operation == "prefill":
                session.prefill(THIRD)
            else:
                session.score(THIRD, [20, 21, 22])
        monkeypatch.undo()
        assert_same_state(state_of(session), before)
    assert [r.token for r in session.stream_generate(THIRD, max_tokens=6)] == reference_third(identity)


def test_flipped_bytes_in_the_kv_data_are_refused_and_old_files_still_load(identity, tmp_path):
    session = two_turns(identity)
    path = save_session(session, tmp_path / "s.safetensors")
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:header])
    name, entry = next((k, v) for k, v in meta.items() if k != "__metadata__" and v["dtype"] == "F32"
                       and v["data_offsets"][1] - v["data_offsets"][0] > 64)
    start = header + entry["data_offsets"][0]
    data[start + 40] ^= 0x10  # one bit of one K/V value
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(KVPError, match=r"is corrupt \(checksum mismatch\)$"):
        load_session(identity, bad)
    # a version-1 file (no checksum, written before it existed) loads, unverified
    arrays, flat = mx.load(str(path), return_metadata=True)
    old = {k: v for k, v in flat.items() if k not in ("0.checksum", "0.repair")}
    old["0.version"] = "1"
    legacy = tmp_path / "legacy.safetensors"
    mx.save_safetensors(str(legacy), arrays, old)
    resumed = load_session(identity, legacy)
    assert resumed.tokens == session.tokens
    # a version-2 file whose checksum was taken out is corrupt
    stripped = tmp_path / "stripped.safetensors"
    mx.save_safetensors(str(stripped), arrays, {k: v for k, v in flat.items() if k != "0.checksum"})
    with pytest.raises(KVPError, match="checksum is missing"):
        load_session(identity, stripped)


def test_a_repair_in_progress_is_saved_and_resumed_exactly(identity, tmp_path):
    session = two_turns(identity)
    report = session.repair(should_stop=iter([False, True]).__next__, prefill_step_size=4)
    assert not report.complete
    loaded = load_session(identity, save_session(session, tmp_path / "r.safetensors"))
    assert (loaded._repair.start, loaded._repair.position) == (session._repair.start, session._repair.position)
    assert loaded.repair().positions == session.repair().positions == len(session.tokens) - 4
    assert loaded.generate(THIRD, max_tokens=6) == session.generate(THIRD, max_tokens=6)


def test_bad_file_messages_are_ours(identity, tmp_path):
    folder = tmp_path / "d.safetensors"
    folder.mkdir()
    with pytest.raises(KVPError, match="is a directory"):
        load_session(identity, folder)
    garbage = tmp_path / "g.safetensors"
    garbage.write_text('{"not": "a safetensors file"}' * 10)
    with pytest.raises(KVPError) as info:
        load_session(identity, garbage)
    assert "truncated or corrupt" in str(info.value) and "json" not in str(info.value).lower()
    assert "\n" not in str(info.value)


def test_a_system_prompt_without_a_chat_template_is_refused(identity):
    assert not identity.tokenizer.has_chat_template
    with pytest.raises(KVPError, match="a system prompt needs the chat template"):
        Session(identity, system_prompt="be brief")


def test_a_repair_interrupted_between_two_layers_resumes_exactly(identity, monkeypatch):
    """A signal can land between the layers of a repair chunk's forward pass: every layer of the
    repair's cache goes back to the repair's progress (one trim for all would leave them unequal)."""
    session = two_turns(identity)
    second = identity.base.layers[1]
    layer_call = type(second).__call__
    calls = []

    def call(self, *args, **kwargs):
        if self is second:
            calls.append(1)
            if len(calls) == 2:  # the second chunk: layer 0 has written it, layer 1 has not
                raise KeyboardInterrupt
        return layer_call(self, *args, **kwargs)

    monkeypatch.setattr(type(second), "__call__", call)
    with pytest.raises(KeyboardInterrupt):
        session.repair(prefill_step_size=4)
    monkeypatch.undo()
    state = session._repair
    assert state is not None and state.position == 4
    assert {c.offset for c in state.cache} == {state.position}
    session.verify()
    session.repair()
    assert [r.token for r in session.stream_generate(THIRD, max_tokens=6)] == reference_third(identity)
