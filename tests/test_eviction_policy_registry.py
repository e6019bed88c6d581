"""A third-party eviction policy, registered here in the test module (not in the package): `kvp-mlx
chat --help` and `kvp-mlx conv-eval --help` list it; with a budget above the history it answers
exactly as full KV (block-wise prefill, ConversationMemory, conv-eval, a bounded session); with a
small budget it evicts what it says; a name that is not registered gives one line."""

from __future__ import annotations

import json
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from kvp_mlx import testing as mb
from kvp_mlx.cli import main
from kvp_mlx.epicache.cache import CompressedKVCache
from kvp_mlx.epicache.evaluate import evaluate
from kvp_mlx.epicache.loaders import load_conversations
from kvp_mlx.epicache.memory import BoundedMemory, ConversationMemory
from kvp_mlx.epicache.policies import (
    EvictionPolicy, available_policies, get_policy, register_policy, unregister_policy,
)
from kvp_mlx.epicache.prefill import LEVELS, build_memory
from kvp_mlx.epicache.scoring import compressed_layers
from kvp_mlx.errors import KVPError
from kvp_mlx.model import load
from kvp_mlx.conversation.session import Session

from conftest import ARCHS, VOCAB
from test_epicache import LOCOMO

NAME = "oldest-first"
SUMMARY = "keeps the oldest entries of every head (a policy of the test module)"


@dataclass(frozen=True)
class OldestFirstScorer:
    """Higher for older positions: eviction keeps the first ``budget`` positions of the history."""

    block_queries = 0

    def score(self, model: nn.Module, cache: list, block_queries: dict | None) -> dict[int, mx.array]:
        return {i: mx.where(c.valid_mask(), -c.positions.astype(mx.float32), -mx.inf)
                for i, c in compressed_layers(cache)}


@pytest.fixture
def oldest_first():
    policy = register_policy(EvictionPolicy(NAME, SUMMARY, lambda tokenizer, episode: OldestFirstScorer()))
    yield policy
    unregister_policy(NAME)


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _kept_positions(cache: list) -> list[list[set[int]]]:
    """Per compressed layer, per KV head: the positions it holds."""
    out = []
    for _, c in compressed_layers(cache):
        pos, valid = np.array(c.positions), np.array(c.valid_mask())
        out.append([set(pos[h][valid[h]].tolist()) for h in range(pos.shape[0])])
    return out


@pytest.mark.parametrize("command", ["chat", "conv-eval"])
def test_listed_by_help_while_registered(capsys, oldest_first, command):
    out = _help(capsys, command)
    assert NAME in out and SUMMARY in out
    assert NAME in available_policies() and NAME in available_policies(evicting=True)


def test_not_listed_once_unregistered(capsys):
    register_policy(EvictionPolicy(NAME, SUMMARY, lambda tokenizer, episode: OldestFirstScorer()))
    unregister_policy(NAME)
    assert NAME not in available_policies()
    for command in ("chat", "conv-eval"):
        out = _help(capsys, command)
        assert NAME not in out and "streaming" in out


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_above_history_equals_full_kv(oldest_first, arch):
    model = mb.build_model(mb.tiny_config(arch, n_layers=3, vocab_size=VOCAB), seed=1)
    history, question = _tokens(70), _tokens(5, 1)
    full = model(mx.array([history + question]))[0, -1]
    scorer = get_policy(NAME).scorer(tokenizer=None)
    assert isinstance(scorer, OldestFirstScorer)
    for level in LEVELS:
        mem = build_memory(model, history, 200, scorer, block=16, level=level)
        assert mem.position == 70 and mem.blocks == 5
        out = model(mx.array([question]), cache=mem.cache)[0, -1]
        assert float(mx.abs(out - full).max()) < 1e-5, (arch, level)


def test_small_budget_evicts(oldest_first):
    model = mb.build_model(mb.tiny_config("qwen3", n_layers=2, vocab_size=VOCAB), seed=2)
    history, question = _tokens(70, 3), _tokens(5, 4)
    for level in LEVELS:
        mem = build_memory(model, history, 8, get_policy(NAME).scorer(None), block=16, level=level)
        assert mem.position == 70
        for heads in _kept_positions(mem.cache):  # the 8 oldest positions, in every head of every layer
            assert heads == [set(range(8))] * len(heads), level
        out = model(mx.array([question]), cache=mem.cache)[0, -1]
        full = model(mx.array([history + question]))[0, -1]
        assert float(mx.abs(out - full).max()) > 1e-3  # 62 of 70 positions gone: the answer changes


def test_conversation_memory_and_bounded_session(oldest_first, identity_dirs):
    """The library takes the registered policy by name: a ConversationMemory and a bounded session
    with a budget above the history answer as full KV; a small budget keeps the oldest entries."""
    model = load(identity_dirs["llama"])
    history, question = _tokens(60, 5), _tokens(4, 6)
    full = model.base(mx.array([history + question]))[0, -1]
    memory = ConversationMemory(model, history, NAME, 4096, block=16)
    out = model.base(mx.array([question]), cache=memory.memory_for("").cache)[0, -1]
    assert float(mx.abs(out - full).max()) < 1e-5
    small = ConversationMemory(model, history, NAME, 6, block=16)
    for heads in _kept_positions(small.memories[0].cache):
        assert heads == [set(range(6))] * len(heads)

    messages = [_tokens(20, 7), _tokens(30, 8), _tokens(25, 9)]
    plain = Session(model, method="base")
    bounded = Session(model, kv=BoundedMemory(model, NAME, 4096, block=64))
    for m in messages:
        assert bounded.generate(m, max_tokens=4) == plain.generate(m, max_tokens=4)
        bounded.compress()
    tight = Session(model, kv=BoundedMemory(model, NAME, 8, block=32))
    for m in messages:
        tight.generate(m, max_tokens=4)
        assert tight.compress().complete
    assert len(tight.tokens) > 8 + 32
    for heads in _kept_positions(tight.caches.cache):
        assert heads == [set(range(8))] * len(heads)
    assert all(isinstance(c, CompressedKVCache) for c in tight.caches.cache)


def test_conv_eval_budget_above_history_answers_as_full(oldest_first, identity_dirs, tmp_path):
    data = tmp_path / "locomo.json"
    data.write_text(json.dumps(LOCOMO))
    answers = {}
    for policy, budget in ((NAME, ["--budget", "4096"]), ("full", [])):
        out = tmp_path / f"{policy}.json"
        assert main(["conv-eval", "--data", str(data), "--format", "locomo", "--model", str(identity_dirs["llama"]),
                     "--policy", policy, *budget, "--block", "32", "--max-tokens", "4", "--json", str(out)]) == 0
        answers[policy] = [r["prediction"] for r in json.loads(out.read_text())["results"]]
    assert len(answers[NAME]) == 2 and answers[NAME] == answers["full"]
    # the library's evaluate takes it too, and with a small budget it evicts
    model = load(identity_dirs["llama"])
    conversations = load_conversations(data, "locomo")
    report = evaluate(model, conversations, NAME, 4, block=8, max_tokens=2)
    assert len(report.results) == 2 and report.peak_kv_bytes > 0


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unregistered_name_one_line(capsys, identity_dirs):
    assert NAME not in available_policies()
    err = one_line_error(capsys, ["chat", "--model", "unused", "--kv-budget", "8", "--kv-policy", NAME])
    assert f"unknown --kv-policy '{NAME}' (choose from epicache, streaming, snapkv, kvzip, infinipot)" in err
    err = one_line_error(capsys, ["conv-eval", "--data", "unused", "--format", "locomo", "--model", "unused",
                                  "--policy", NAME, "--budget", "8"])
    assert f"unknown --policy '{NAME}' (choose from epicache, streaming, snapkv, kvzip, infinipot, full)" in err
    model = load(identity_dirs["llama"])
    for build in (lambda: ConversationMemory(model, _tokens(10), NAME, 8),
                  lambda: BoundedMemory(model, NAME, 8),
                  lambda: evaluate(model, [], NAME, 8),
                  lambda: unregister_policy(NAME)):
        with pytest.raises(KVPError) as e:
            build()
        assert f"unknown KV policy '{NAME}' (choose from epicache, streaming" in str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(KVPError, match="unknown KV policy 'full'"):
        BoundedMemory(model, "full", 8)  # registered, but it never evicts: not for a bounded conversation


def test_registration_refuses_duplicates_and_bad_names(oldest_first):
    with pytest.raises(KVPError, match="already registered"):
        register_policy(EvictionPolicy(NAME, SUMMARY, None))
    with pytest.raises(KVPError, match="already registered"):
        register_policy(EvictionPolicy("full", "another full", None))
    for bad in ("", "two words", "a,b"):
        with pytest.raises(KVPError, match="one word"):
            register_policy(EvictionPolicy(bad, SUMMARY, None))
    with pytest.raises(KVPError, match="one-line summary"):
        register_policy(EvictionPolicy("multi-line", "one\ntwo", None))
    assert get_policy(NAME) is oldest_first and available_policies()[-1] == NAME
