"""The conversation profile of the benchmark (bench.conversation), end to end on tiny models."""

from __future__ import annotations

import json

from kvp_mlx import testing as mb
from bench import conversation
from bench.models import BenchGroup
from bench.ttft import main as ttft_main
from kvp_mlx.model import KVPModel

CASES = ("base-warm", "kvp-warm[aux]", "base-cold", "kvp-cold[aux]", "repair[aux]")
RATIOS = {
    "kvp-warm speedup over base-warm (base-warm / kvp-warm)",
    "base-warm speedup over base-cold (base-cold / base-warm)",
    "kvp-warm speedup over kvp-cold (kvp-cold / kvp-warm)",
    "kvp-warm speedup over base-cold (base-cold / kvp-warm)",
    "repair seconds over kvp-warm TTFT (repair / kvp-warm)",
    "repair seconds over base-warm TTFT (repair / base-warm)",
}


def _check_run(run: dict, history: int, lengths: list[int], samples: int) -> None:
    cases = {c["label"]: c for c in run["cases"]}
    assert set(cases) == {f"{case} N={n}" for case in CASES for n in lengths}
    for c in run["cases"]:
        assert len(c["samples_s"]) == samples and c["median_s"] > 0 and "skipped" not in c
    for n in lengths:
        # every warm turn started from the history alone (the session was trimmed back after each sample)
        assert cases[f"base-warm N={n}"]["info"] == {"reused_tokens": history, "prefilled_tokens": n,
                                                     "predicted_positions": 0}
        assert cases[f"kvp-warm[aux] N={n}"]["info"] == {"reused_tokens": history, "prefilled_tokens": n,
                                                         "predicted_positions": n - 1}
        for cold in ("base-cold", "kvp-cold[aux]"):
            assert cases[f"{cold} N={n}"]["info"]["reused_tokens"] == 0
            assert cases[f"{cold} N={n}"]["info"]["prefilled_tokens"] == history + n
        repair = cases[f"repair[aux] N={n}"]["info"]
        # from the first predicted position (the new message's first) to the end of the turn
        assert repair["start"] == history and repair["end"] >= history + n
        assert repair["positions"] == repair["end"] - history
        ratios = {r["ratio"]: r for r in run["ratios"] if r["new_tokens"] == n}
        assert set(ratios) == RATIOS
        for r in ratios.values():
            assert r["value"] > 0 and r["ratio_of_medians"] > 0


def test_conversation_profile_end_to_end(random_pair_dir, tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401

        plots = True
    except ImportError:
        plots = False
    rc = ttft_main(["--profile", "conversation", "--model", str(random_pair_dir), "--history-tokens", "12",
               "--new-tokens", "3,6", "-n", "2", "--prefill-step-size", "4", "--out", str(tmp_path),
               "--name", "conv", *([] if plots else ["--no-plots"])])
    assert rc == 0
    result = json.loads((tmp_path / "conv.json").read_text())
    assert result["schema"] == conversation.SCHEMA
    assert result["command"].startswith("python -m bench.ttft --profile conversation --model ")
    assert "--history-tokens 12 --new-tokens 3,6" in result["command"]
    [run] = result["runs"]
    assert run["device"] == "cpu" and run["dtype"] == "float32" and run["history_tokens"] == 12
    _check_run(run, 12, [3, 6], samples=2)
    md = (tmp_path / "conv.md").read_text()
    assert "| base-warm N=3 |" in md and "| repair[aux] N=6 |" in md and "## Ratios" in md
    assert (tmp_path / "conv-ttft.png").is_file() == plots
    assert "wrote" in capsys.readouterr().out
    # re-rendering from the JSON measures nothing and writes the same markdown
    (tmp_path / "conv.md").unlink()
    assert ttft_main(["--from-json", str(tmp_path / "conv.json"), "--no-plots"]) == 0
    assert (tmp_path / "conv.md").read_text() == md


def test_models_without_a_tokenizer_take_token_ids():
    """The random-weight pairs have no tokenizer: sessions over them take ids and spell replies as ids."""
    base_cfg = mb.tiny_config("openelm", n_layers=3, vocab_size=300)
    aux_cfg = mb.tiny_config("openelm", n_layers=2, vocab_size=300)
    base, aux = mb.build_model(base_cfg, seed=1), mb.build_model(aux_cfg, seed=2)
    predictor = mb.make_predictor(base, aux, init="random", seed=3)
    group = BenchGroup("tiny", KVPModel(base=base, tokenizer=None),
                       {"aux": KVPModel(base=base, tokenizer=None, aux=aux, predictor=predictor)})
    settings = conversation.make_settings(models=["unused"], history_tokens=10, new_tokens=[4], repetitions=1,
                                          prefill_step_size=8)
    run = conversation.benchmark_group(group, settings, log=lambda _: None)
    _check_run(run, 10, [4], samples=1)


def test_conversation_options_are_checked(random_pair_dir, capsys):
    assert ttft_main(["--profile", "conversation", "--model", str(random_pair_dir), "--prompt-lengths", "8"]) == 1
    assert "--prompt-lengths: not used by the conversation profile" in capsys.readouterr().err
    assert ttft_main(["--model", str(random_pair_dir), "--new-tokens", "8"]) == 1
    assert "--new-tokens: not used by profile quick" in capsys.readouterr().err
    assert ttft_main(["--profile", "conversation", "--model", str(random_pair_dir),
                 "--history-tokens", "0"]) == 1
    assert "--history-tokens must be at least 1" in capsys.readouterr().err
