"""The accuracy report's conversation turns (bench/accuracy.py): base, kvp on warm caches, kvp with
repair between turns, one-shot kvp.

With an auxiliary that is a copy of the base and an identity predictor, predicted K/V are the base's
own, so all four conditions must score every turn like the base: this checks warm KV Prediction
and repair for exactness. The base condition is checked against mlx-lm's model run on the whole
text at once."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

import mlx.core as mx

from bench.accuracy import (
    CONDITIONS, conversation_file_scores, conversation_samples, main,
)
from kvp_mlx.model import load

P, C = 24, 8  # small turns for the tiny models


def heldout_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "heldout.jsonl"
    records = [{"name": "short.py", "text": "x = 1\n"},  # too short for three turns: skipped
               {"name": "textwrap.py", "text": Path(textwrap.__file__).read_text()}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_samples_cut_each_file_into_consecutive_turns(tmp_path, identity_dirs):
    model = load(identity_dirs["openelm"])
    ids = list(model.tokenizer.encode(Path(textwrap.__file__).read_text()))
    conversations = conversation_samples(heldout_jsonl(tmp_path), model.tokenizer, 3, P, C)
    assert [name for name, _ in conversations] == ["textwrap.py"]
    turns = conversations[0][1]
    assert [t for prompt, cont in turns for t in prompt + cont] == ids[: 3 * (P + C)]
    assert [(len(p), len(c)) for p, c in turns] == [(P, C)] * 3
    every = conversation_samples(heldout_jsonl(tmp_path), model.tokenizer, 3, P, C, windows=0)
    assert len(every) == len(ids) // (3 * (P + C)) and every[1][0] == "textwrap.py#1"
    assert every[1][1][0][0] == ids[3 * (P + C) : 3 * (P + C) + P]


@pytest.mark.parametrize("arch", ["openelm", "llama"])
def test_identity_predictor_gives_the_base_scores_in_every_condition(tmp_path, identity_dirs, arch):
    model = load(identity_dirs[arch])
    turns = conversation_samples(heldout_jsonl(tmp_path), model.tokenizer, 3, P, C)[0][1]
    scores = conversation_file_scores(model, turns)
    assert scores["repaired"] == [P + C, P + C]  # everything before turn 2, then turn 2 (from its prompt)

    # the base condition against mlx-lm's model on the whole text in one call
    ids = [t for prompt, cont in turns for t in prompt + cont]
    logits = model.base(mx.array([ids]))[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for i in range(3):
        start = i * (P + C) + P  # the continuation's first position
        targets = mx.array(ids[start : start + C])
        rows = logprobs[start - 1 : start + C - 1]
        expected = float(mx.take_along_axis(rows, targets[:, None], axis=-1).sum())
        assert scores["base"][i][1] == pytest.approx(expected, abs=1e-4)
        assert scores["base"][i][0] == int((mx.argmax(rows, axis=-1) == targets).sum())

    for condition in CONDITIONS[1:]:
        for (correct, loglik), (base_correct, base_loglik) in zip(scores[condition], scores["base"]):
            assert correct == base_correct, condition
            assert loglik / C == pytest.approx(base_loglik / C, abs=1e-5), condition


def test_conditions_differ_with_a_real_predictor(tmp_path, random_pair_dir):
    """A random predictor: the kvp conditions share turn 1 exactly and part ways after it."""
    model = load(random_pair_dir)
    turns = conversation_samples(heldout_jsonl(tmp_path), model.tokenizer, 3, P, C)[0][1]
    scores = conversation_file_scores(model, turns)
    assert scores["kvp"][0] == scores["kvp + repair"][0] == scores["kvp one-shot"][0] != scores["base"][0]
    assert scores["kvp + repair"][1][1] != scores["kvp"][1][1]  # the repair changed the history's K/V
    assert scores["kvp one-shot"][1][1] != scores["kvp"][1][1]  # predicting the continuation too
    assert scores["repaired"] == [P + C, P + C]


def test_cli_writes_the_conversation_report(tmp_path, identity_dirs):
    out = tmp_path / "out"
    assert main(["--conversation", "--model-dir", str(identity_dirs["openelm"]), "--heldout",
                 str(heldout_jsonl(tmp_path)), "--out", str(out)]) == 0
    report = json.loads((out / "conversation-accuracy.json").read_text())
    assert report["conversations"] == 1 and report["turns"] == 3
    assert (report["prompt_tokens"], report["continuation_tokens"]) == (128, 64)
    rows = report["summary"]["conditions"]
    assert list(rows) == list(CONDITIONS)
    for condition in CONDITIONS:
        assert list(rows[condition]) == ["turn 1", "turn 2", "turn 3", "all"]
        assert rows[condition]["all"]["tokens"] == 3 * 64
        assert rows[condition]["all"]["mean_loglik"] == pytest.approx(rows["base"]["all"]["mean_loglik"], abs=1e-5)
    table = (out / "conversation-accuracy.md").read_text()
    assert all(f"| {condition} | " in table for condition in CONDITIONS)
    assert "kvp + repair >= kvp on both metrics" in table
