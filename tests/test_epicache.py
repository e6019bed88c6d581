"""EpiCache on MLX: exactness with a large budget, scores and kept sets against numpy, padding,
budgets, KV-Prediction-built memories, loaders and conv-eval."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm.models.llama as llama_module
import numpy as np
import pytest

from kvp_mlx import testing as mb
from kvp_mlx.cli import main
from kvp_mlx.epicache import budgets
from kvp_mlx.epicache.cache import CompressedKVCache
from kvp_mlx.epicache.loaders import load_conversations
from kvp_mlx.epicache.memory import ConversationMemory
from kvp_mlx.epicache.prefill import LEVELS, PromptScorer, RecencyScorer, WindowScorer, build_memory
from kvp_mlx.epicache.synthetic import conversations
from kvp_mlx.errors import KVPError
from kvp_mlx.model import load

from conftest import ARCHS, VOCAB

SCORERS = {"full": None, "prompt": PromptScorer((5, 9, 33, 7, 81, 2, 60)), "window": WindowScorer(8),
           "recency": RecencyScorer(4)}


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_above_history_equals_full_kv(arch):
    model = mb.build_model(mb.tiny_config(arch, n_layers=3, vocab_size=VOCAB), seed=1)
    history, question = _tokens(70), _tokens(5, 1)
    full = model(mx.array([history + question]))[0, -1]
    for name, scorer in SCORERS.items():
        for level in LEVELS:
            mem = build_memory(model, history, 200, scorer, block=16, level=level)
            assert mem.position == 70 and all(c.offset == 70 for c in mem.cache)
            out = model(mx.array([question]), cache=mem.cache)[0, -1]
            assert float(mx.abs(out - full).max()) < 1e-5, (arch, name, level)


def _record_sdpa(monkeypatch):
    calls = []
    real = llama_module.scaled_dot_product_attention

    def record(queries, keys, values, cache, scale, mask, **kw):
        calls.append((np.array(queries), np.array(keys), scale))
        return real(queries, keys, values, cache=cache, scale=scale, mask=mask, **kw)

    monkeypatch.setattr(llama_module, "scaled_dot_product_attention", record)
    return calls


def _numpy_scores(q: np.ndarray, k: np.ndarray, scale: float, causal_from: int | None = None) -> np.ndarray:
    """Independent definition: softmax over the keys of q k^T * scale, max over GQA group and queries."""
    _, hq, p, d = q.shape
    h, s = k.shape[1], k.shape[2]
    logits = np.einsum("hgpd,hsd->hgps", q[0].reshape(h, hq // h, p, d).astype(np.float64) * scale,
                       k[0].astype(np.float64))
    if causal_from is not None:  # query i sits at position causal_from + i
        vis = np.arange(s)[None] <= (causal_from + np.arange(p))[:, None]
        logits = np.where(vis[None, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs.max(axis=(1, 2))  # [H, S]


def _numpy_keep(scores: np.ndarray, budget: int, level: str) -> list[set[int]]:
    h = scores.shape[0]
    if level == "pair":
        flat = np.argsort(-scores.reshape(-1), kind="stable")[: budget * h]
        return [set((flat[flat // scores.shape[1] == i] % scores.shape[1]).tolist()) for i in range(h)]
    return [set(np.argsort(-scores[i], kind="stable")[:budget].tolist()) for i in range(h)]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", ["prompt", "window"])
def test_scores_and_kept_sets_match_numpy(monkeypatch, level, kind):
    """One block, so every key's position is its slot: the kept positions of each head must be a
    numpy top-k of scores computed (in float64) from the queries and keys mlx-lm's attention got."""
    model = mb.build_model(mb.tiny_config("llama", n_layers=2, vocab_size=VOCAB), seed=3)
    calls = _record_sdpa(monkeypatch)
    history, budget = _tokens(40, 2), 6
    scorer = SCORERS[kind]
    mem = build_memory(model, history, budget, scorer, block=40, level=level)
    for layer in range(2):
        if kind == "prompt":  # the scoring pass: 7 queries over 40 kept + 7 own keys; score over the 40
            q, k, scale = [c for c in calls if c[0].shape[2] == 7][layer]
            scores = _numpy_scores(q, k[:, :, :40], scale)
        else:  # SnapKV: the block's last 8 queries, causally
            q, k, scale = [c for c in calls if c[0].shape[2] == 40][layer]
            scores = _numpy_scores(q[:, :, -8:], k, scale, causal_from=32)
        cache = mem.cache[layer]
        assert isinstance(cache, CompressedKVCache)
        pos, valid = np.array(cache.positions), np.array(cache.valid_mask())
        kept = [set(pos[i][valid[i]].tolist()) for i in range(pos.shape[0])]
        assert kept == _numpy_keep(scores, budget, level), (layer, level, kind)
        assert sum(map(len, kept)) == budget * pos.shape[0]
        if level == "pair-uniform":
            assert all(len(s) == budget for s in kept)


def test_pair_padding_is_masked():
    """Padded slots (pair eviction) never change the output: fill them with garbage."""
    model = mb.build_model(mb.tiny_config("llama", n_layers=3, vocab_size=VOCAB), seed=4)
    mem = build_memory(model, _tokens(80, 3), 8, SCORERS["prompt"], block=20, level="pair")
    assert any(c.valid is not None for c in mem.cache), "no head got a different length: weak test"
    question = mx.array([_tokens(4, 5)])
    ref = model(question, cache=mem.copy().cache)[0, -1]
    for c in mem.cache:
        if c.valid is not None:
            k, v = c.stored()
            pad = ~c.valid[None, :, :, None]
            c.keys = mx.where(pad, 1e3 * mx.random.normal(k.shape), k)
            c.values = mx.where(pad, 1e3 * mx.random.normal(v.shape), v)
    assert float(mx.abs(model(question, cache=mem.cache)[0, -1] - ref).max()) < 1e-5


def test_peak_slots_bounded_and_positions_true():
    model = mb.build_model(mb.tiny_config("qwen3", n_layers=2, vocab_size=VOCAB), seed=5)
    for level in LEVELS:
        mem = build_memory(model, _tokens(300, 6), 16, SCORERS["recency"], block=32, level=level)
        assert mem.position == 300 and all(c.offset == 300 for c in mem.cache)
        assert mem.peak_slots == 16 + 32  # recency keeps the same positions in every head: no padding
        pos = np.array(mem.cache[0].positions)
        assert sorted(pos[0].tolist()) == [0, 1, 2, 3] + list(range(288, 300))  # 4 sinks + 12 most recent


def test_budget_formula():
    sens = [1.0, 0.9, 0.7, 0.5]
    got = budgets.allocate(sens, 100, 1.0)
    norm = (np.array(sens) - 0.5) / 0.5
    weight = 1 - norm
    want = np.maximum((weight * 4 * 100 / weight.sum()).astype(int), 25)
    assert got == want.tolist() == [25, 44, 133, 222]  # weights 0, .2, .6, 1 over 1.8
    assert budgets.allocate(sens, 100, 0.0) == [100] * 4
    assert sum(budgets.allocate(sens, 100, 1.3)) >= 400 - 4  # int casts drop < 1 per layer; clamps add
    assert min(budgets.allocate([0.1, 0.9, 0.99, 1.0], 64, 3.0)) == 16


def test_sensitivity_profile_layer0_is_one():
    model = mb.build_model(mb.tiny_config("llama", n_layers=3, vocab_size=VOCAB), seed=7)
    sens = budgets.sensitivity(model, _tokens(200, 8), block=40, sink=4)
    assert sens[0] == pytest.approx(1.0, abs=1e-6)  # its keys see only embeddings
    assert all(s < 1.0 for s in sens[1:])


def test_kvp_built_memory_equals_base_built(identity_dirs):
    """Identity auxiliary + identity predictor: the KV-Prediction-built memory equals the base's."""
    model = load(identity_dirs["llama"])
    history = _tokens(90, 9)
    base = build_memory(model.base, history, 10, SCORERS["prompt"], block=30, level="pair")
    kvp = build_memory(model.base, history, 10, SCORERS["prompt"], block=30, level="pair",
                       aux=model.aux, predictor=model.predictor, dtype=model.dtype)
    for a, b in zip(base.cache, kvp.cache):
        assert np.array_equal(np.array(a.positions), np.array(b.positions))
        (ka, va), (kb, vb) = a.stored(), b.stored()
        assert float(mx.abs(ka - kb).max()) < 1e-5 and float(mx.abs(va - vb).max()) < 1e-5
    with pytest.raises(KVPError, match="SnapKV"):
        build_memory(model.base, history, 10, SCORERS["window"], aux=model.aux, predictor=model.predictor)


def test_session_continues_from_memory(identity_dirs):
    model = load(identity_dirs["qwen3"])
    history = _tokens(60, 10)
    memory = ConversationMemory(model, history, "full")
    session = memory.session()
    assert session.offset == 60
    reply = session.generate(_tokens(3, 11), max_tokens=4)
    from kvp_mlx.conversation.session import Session
    plain = Session(model, method="base")
    assert plain.generate(history + _tokens(3, 11), max_tokens=4) == reply


# --- loaders and conv-eval -----------------------------------------------------------------------

LOCOMO = [{"sample_id": "conv-1", "conversation": {
    "speaker_a": "Ann", "speaker_b": "Bob", "session_1_date_time": "1:56 pm on 8 May, 2023",
    "session_1": [{"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat named Tom."},
                  {"speaker": "Bob", "dia_id": "D1:2", "text": "Nice!", "blip_caption": "a photo of a cat"}],
    "session_2_date_time": "2 pm on 9 May, 2023",
    "session_2": [{"speaker": "Bob", "dia_id": "D2:1", "text": "I moved to Oslo."}]},
    "qa": [{"question": "What is Ann's cat called?", "answer": "Tom", "evidence": ["D1:1"], "category": 1},
           {"question": "When did Bob move?", "answer": 2023, "evidence": ["D2:1"], "category": 2},
           {"question": "What is Bob's dog called?", "adversarial_answer": "Rex", "evidence": [], "category": 5}]}]
LONGMEMEVAL = [{"question_id": "q1", "question_type": "single-session-user", "question": "Where did I go?",
                "answer": "Kyoto", "question_date": "2023/05/30 (Tue) 10:00",
                "haystack_session_ids": ["s1", "s2"], "haystack_dates": ["2023/05/20", "2023/05/21"],
                "haystack_sessions": [[{"role": "user", "content": "I went to Kyoto.", "has_answer": True},
                                       {"role": "assistant", "content": "How was it?"}],
                                      [{"role": "user", "content": "Any recipe ideas?"}]],
                "answer_session_ids": ["s1"]}]
REALTALK = {"name": {"speaker_1": "Emi", "speaker_2": "Elise"},
            "session_1": [{"speaker": "Emi", "clean_text": "I love hiking.", "dia_id": "D1:1",
                           "date_time": "20.01.2024, 10:00:00"}],
            "session_1_date_time": "20.01.2024",
            "qa": [{"question": "What does Emi love?", "answer": "hiking", "evidence": ["D1:1"], "category": 1}]}


def test_loaders(tmp_path):
    (tmp_path / "locomo10.json").write_text(json.dumps(LOCOMO))
    (tmp_path / "longmemeval_s.json").write_text(json.dumps(LONGMEMEVAL))
    (tmp_path / "Chat_1_Emi_Elise.json").write_text(json.dumps(REALTALK))
    (conv,) = load_conversations(tmp_path / "locomo10.json", "locomo")
    assert [u.speaker for u in conv.utterances] == ["Ann", "Bob", "Bob"]
    assert conv.utterances[1].text == "Nice! [shares a photo of a cat]" and conv.utterances[2].session == 1
    assert [(q.question, q.answer) for q in conv.questions] == [("What is Ann's cat called?", "Tom"),
                                                                ("When did Bob move?", "2023")]
    assert "Session 2 (2 pm on 9 May, 2023):\nBob said, \"I moved to Oslo.\"" in conv.history_text()
    (conv,) = load_conversations(tmp_path / "longmemeval_s.json", "longmemeval")
    assert conv.id == "q1" and len(conv.utterances) == 3 and conv.utterances[1].speaker == "Assistant"
    assert conv.questions[0].answer == "Kyoto" and "2023/05/30" in conv.questions[0].question
    (conv,) = load_conversations(tmp_path / "Chat_1_Emi_Elise.json", "realtalk")
    assert conv.utterances[0].text == "I love hiking." and conv.questions[0].answer == "hiking"


@pytest.mark.parametrize("fmt,data,breaks,field", [
    ("locomo", LOCOMO, lambda d: d[0]["qa"][0].pop("question"), "[0].qa[0].question"),
    ("locomo", LOCOMO, lambda d: d[0]["conversation"]["session_1"][1].pop("speaker"),
     "[0].conversation.session_1[1].speaker"),
    ("longmemeval", LONGMEMEVAL, lambda d: d[0]["haystack_sessions"][0][1].pop("content"),
     "[0].haystack_sessions[0][1].content"),
    ("longmemeval", LONGMEMEVAL, lambda d: d[0].update(answer=[1]), "[0].answer"),
    ("realtalk", REALTALK, lambda d: d.pop("qa"), "qa"),
])
def test_malformed_files_one_line_error(tmp_path, capsys, fmt, data, breaks, field):
    bad = json.loads(json.dumps(data))
    breaks(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    assert main(["conv-eval", "--data", str(path), "--format", fmt, "--model", "unused", "--policy", "full"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and f"'{field}'" in err


@pytest.mark.parametrize("fmt,data,policy", [("locomo", LOCOMO, "epicache"), ("longmemeval", LONGMEMEVAL, "snapkv"),
                                             ("synthetic", conversations(1, sessions=2, filler=1), "streaming")])
def test_conv_eval_end_to_end(tmp_path, capsys, identity_dirs, fmt, data, policy):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "out.json"
    args = ["conv-eval", "--data", str(path), "--format", fmt, "--model", str(identity_dirs["llama"]),
            "--policy", policy, "--budget", "16", "--block", "32", "--episodes", "2", "--medoids", "1",
            "--max-tokens", "3", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert len(report["results"]) == {"locomo": 2, "longmemeval": 1, "synthetic": 2}[fmt]
    assert all(0.0 <= r["f1"] <= 1.0 for r in report["results"])
    printed = capsys.readouterr().out
    assert "mean F1" in printed and "peak KV" in printed
