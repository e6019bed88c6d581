"""The toy world's rebuild check (bench/toyworld.py compare_runs)."""

from bench.toyworld import compare_runs

REFERENCE = {
    "profile": "full",
    "tokenizer_fingerprint": "ad46",
    "seconds": {"base": 10.0},
    "base": {"steps": 1200, "heldout_ce": 3.10},
    "kvp-c": {"steps": 100, "heldout_ce": 3.30},
}


def rebuild(**changes):
    run = {k: (dict(v) if isinstance(v, dict) else v) for k, v in REFERENCE.items()}
    for stage, ce in changes.items():
        run[stage.replace("_", "-")]["heldout_ce"] = ce
    return run


def test_identical_rebuild_matches(capsys):
    assert compare_runs(rebuild(), REFERENCE, 0.02)
    assert "matches" in capsys.readouterr().out


def test_loss_outside_tolerance_fails(capsys):
    assert compare_runs(rebuild(base=3.10 + 0.01), REFERENCE, 0.02)
    assert not compare_runs(rebuild(kvp_c=3.30 + 0.05), REFERENCE, 0.02)
    assert "kvp-c" in capsys.readouterr().out


def test_other_tokenizer_or_missing_stage_fails():
    run = rebuild()
    run["tokenizer_fingerprint"] = "beef"
    assert not compare_runs(run, REFERENCE, 0.02)
    run = rebuild()
    del run["kvp-c"]
    assert not compare_runs(run, REFERENCE, 0.02)
