"""bench.kvp_layers: the base answering with predicted K/V on chosen layers (exact elsewhere)."""

from __future__ import annotations

import json

import pytest

from bench.kvp_layers import layer_sets, main, score_layer_sets
from kvp_mlx.epicache.loaders import load_synthetic
from kvp_mlx.epicache.synthetic import conversations
from kvp_mlx.errors import KVPError
from kvp_mlx.model import load


def test_layer_sets_none_each_all_but_one_all():
    assert layer_sets(3) == [(), (0,), (1,), (2,), (1, 2), (0, 2), (0, 1), (0, 1, 2)]
    assert layer_sets(1) == [(), (0,)]


def test_identity_predictor_answers_as_the_base_on_every_layer_set(tmp_path, identity_dirs):
    """Identity auxiliary and predictor: predicted K/V == the base's, so every set answers alike."""
    model = load(identity_dirs["llama"])
    convs = _loaded(tmp_path, conversations(2, sessions=2, filler=1))
    scores = score_layer_sets(model, convs, layer_sets(len(model.base.layers)), max_tokens=3)
    assert all(s.answers == scores[0].answers and s.em == scores[0].em for s in scores)
    assert scores[0].questions == sum(len(c.questions) for c in convs) > 0


def test_a_real_predictor_changes_the_answers(tmp_path, random_pair_dir):
    model = load(random_pair_dir)
    convs = _loaded(tmp_path, conversations(2, sessions=2, filler=1))
    scores = score_layer_sets(model, convs, [(), (0, 1, 2)], max_tokens=4)
    assert scores[0].answers != scores[1].answers


def test_cli_table_and_errors(tmp_path, capsys, identity_dirs):
    data = tmp_path / "conv.json"
    data.write_text(json.dumps(conversations(1, sessions=2, filler=1)))
    out = tmp_path / "scores.json"
    assert main(["--model", str(identity_dirs["llama"]), "--data", str(data), "--format", "synthetic",
                 "--max-tokens", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| none (full KV) |" in printed and "| 0, 1, 2 |" in printed
    assert [s["predicted"] for s in json.loads(out.read_text())] == [list(s) for s in layer_sets(3)]
    assert main(["--model", str(identity_dirs["llama"] / "base"), "--data", str(data), "--format", "synthetic"]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line
    with pytest.raises(KVPError, match="layer sets"):
        score_layer_sets(load(identity_dirs["llama"]), [], [(5,)])


def _loaded(tmp_path, convs):
    """Conversations as the synthetic loader reads them from a file."""
    path = tmp_path / "loaded.json"
    path.write_text(json.dumps(convs))
    return load_synthetic(path)
