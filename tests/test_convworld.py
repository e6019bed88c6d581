"""The conversation world (bench/convworld.py), end to end on its smoke profile: the files, the
numbers' shapes, full KV answering as mlx-lm's own greedy generation does, the KV memory bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.convworld import BASELINES, FRACTIONS, PROFILES, conversation_ids, main
from kvp_mlx.epicache.evaluate import prompt_parts
from kvp_mlx.epicache.loaders import load_synthetic


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("convworld")
    out, res = root / "work", root / "results"
    assert main(["--out", str(out), "--profile", "smoke", "--results", str(res)]) == 0
    return out, res, json.loads((res / "convworld.json").read_text())


def test_files_and_numbers(world):
    out, res, results = world
    runs = results["runs"]
    expected = {"full", "full-kvp", "aux-full"}
    expected |= {f"{p}@{f}" for f in FRACTIONS for p in ("epicache", "epicache-kvp") + BASELINES}
    assert set(runs) == expected
    n_questions = sum(len(c.questions) for c in load_synthetic(out / "data" / "test.json"))
    mean_hist = results["history_tokens"]["mean"]
    for key, run in runs.items():
        assert run["questions"] == n_questions == len(run["answers"])
        assert 0.0 <= run["em"] <= run["f1"] <= 1.0, key  # an exact match has F1 1
        assert run["build_seconds"] > 0 and run["peak_kv_bytes"] > 0
        if run["budget"] is not None:
            assert run["budget"] == max(1, round(run["fraction"] * mean_hist))
    md = (res / "convworld.md").read_text()
    for p in ("epicache", "epicache-kvp") + BASELINES:
        assert f"| {p} |" in md
    assert md.count("EpiCache ") >= len(FRACTIONS)  # one standing sentence per budget
    assert "The auxiliary alone, from its own full KV: EM" in md
    try:
        import matplotlib  # noqa: F401  (the bench extra; CI installs only the test extra)
    except ImportError:
        assert not (res / "convworld.png").exists()
    else:
        assert (res / "convworld.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_kv_is_bounded_by_budget_plus_block(world):
    _, _, results = world
    base, prof = results["base_config"], PROFILES["smoke"]

    def per_entry(cfg: dict) -> int:  # K and V, float32, over layers and heads
        return 2 * cfg["head_dim"] * 4 * sum(cfg["num_kv_heads"])

    for key, run in results["runs"].items():
        if run["budget"] is None:  # full KV: the base's, KV Prediction's or the auxiliary's own
            cfg = results["aux_config"] if key == "aux-full" else base
            assert run["peak_kv_bytes"] == per_entry(cfg) * results["history_tokens"]["max"], key
        else:
            assert run["peak_kv_bytes"] <= per_entry(base) * (run["budget"] + prof.block), key
    assert results["runs"]["streaming@0.125"]["peak_kv_bytes"] == per_entry(base) * (
        results["runs"]["streaming@0.125"]["budget"] + prof.block)


def test_full_kv_answers_equal_mlx_lm_greedy_generation(world):
    """The 'full' policy (block-wise prefill, no eviction) answers as mlx-lm's stream_generate does
    from one plain prefill of the same history and question (greedy, up to EOS)."""
    from mlx_lm import stream_generate

    from kvp_mlx.model import load

    out, _, results = world
    model = load(out / "kvp")
    eos = set(model.tokenizer.eos_token_ids)
    answers = iter(results["runs"]["full"]["answers"])
    predictions = []
    for conv in load_synthetic(out / "data" / "test.json"):
        history = conv.history_text()
        for qa in conv.questions:
            h_ids, q_ids = prompt_parts(model.tokenizer, history, qa.question)
            ids = [r.token for r in stream_generate(model.base, model.tokenizer, h_ids + q_ids, max_tokens=8)]
            ids = ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]
            prediction, gold, _ = next(answers)
            assert gold == qa.answer
            assert prediction == model.tokenizer.decode(ids).strip().split("\n", 1)[0].strip()
            predictions.append(prediction)
    assert any(predictions)  # not all an immediate EOS


def test_training_sequences_hold_each_answer_after_its_question(world):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    out, _, _ = world
    tokenizer = load_tokenizer(out / "tokenizer")
    conv = load_synthetic(out / "data" / "train.json")[0]
    ids, marks = conversation_ids(tokenizer, conv)
    h_ids, q_ids = prompt_parts(tokenizer, conv.history_text(), conv.questions[0].question)
    answer = list(tokenizer.encode(conv.questions[0].answer, add_special_tokens=False))
    first = len(h_ids) + len(q_ids)
    assert ids[: first + len(answer) + 1] == h_ids + q_ids + answer + [tokenizer.eos_token_id]
    assert ids.count(tokenizer.eos_token_id) == len(conv.questions)
    # the answers and their EOS are marked, nothing else
    assert len(marks) == len(ids) and marks[: first] == [0] * first and marks[first: first + len(answer) + 1] == [1] * (
        len(answer) + 1)
    assert sum(marks) == sum(len(tokenizer.encode(qa.answer, add_special_tokens=False)) + 1 for qa in conv.questions)
    # the questions quote the statement whose value they ask for (cloze)
    assert all(qa.question.split(': ', 1)[1] in conv.history_text() for qa in conv.questions)


def test_rerun_skips_every_stage(world):
    out, res, results = world
    weights = out / "base" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["--out", str(out), "--profile", "smoke", "--results", str(res)]) == 0
    assert weights.stat().st_mtime_ns == before
    assert json.loads((res / "convworld.json").read_text())["runs"] == results["runs"]


def test_world_conversations_have_one_place_per_answer(tmp_path):
    """Every fact is stated once, word for word, and its cloze question quotes it; the word before a
    value (its cue) occurs once in the history, and no two facts of a conversation share a value word."""
    import re

    from bench.conversation_world import world_conversations

    convs = world_conversations(200, seed=3, sessions=3, filler=2, cloze=True)
    (tmp_path / "world.json").write_text(json.dumps(convs))
    for conv, parsed in zip(convs, load_synthetic(tmp_path / "world.json")):
        assert len(conv["sessions"]) == 3 and len(conv["qa"]) >= 3
        lines = [t["text"] for s in conv["sessions"] for t in s["turns"]]
        words = re.findall(r"\w+", parsed.history_text())
        values: list[str] = []
        for qa in conv["qa"]:
            quote = re.fullmatch(r"Finish what \w+ said: (.*)", qa["question"]).group(1)
            assert len([ln for ln in lines if ln.startswith(quote + " " + qa["answer"])]) == 1, (quote, qa["answer"])
            assert words.count(quote.split()[-1]) == 1, (quote, parsed.history_text())
            values += qa["answer"].split()
        assert len(values) == len(set(values)), values


def test_the_full_profiles_tokens_put_one_cue_before_each_answer(tmp_path):
    """With the full profile's tokenizer, each answer follows ``<cue> Answer:`` in the training rows,
    and the cue's token occurs once in the history, right before the answer's first token: the model
    finds an answer by copying what followed the token before the answer cue."""
    import dataclasses

    from bench.convworld import build_data
    from bench.toyworld import train_tokenizer
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    prof = dataclasses.replace(PROFILES["full"], train_convs=1500, dev_convs=20, test_convs=1)
    paths = build_data(tmp_path / "data", prof)
    tok = load_tokenizer(train_tokenizer(paths["text"], tmp_path / "tok", vocab=prof.vocab, split_by_script=False))
    (answer_cue,) = tok.encode("\nAnswer:", add_special_tokens=False)[-1:]
    answers = 0
    for conv in load_synthetic(paths["dev"]):
        ids, marks = conversation_ids(tok, conv)
        history = prompt_parts(tok, conv.history_text(), "")[0]
        starts = [i for i in range(1, len(ids)) if marks[i] and not marks[i - 1]]
        assert len(starts) == len(conv.questions)
        for i in starts:
            assert ids[i - 1] == answer_cue
            places = [j for j, t in enumerate(history[:-1]) if t == ids[i - 2]]
            assert len(places) == 1 and history[places[0] + 1] == ids[i], tok.decode(ids[i - 8: i + 2])
            answers += 1
    assert answers >= 60
