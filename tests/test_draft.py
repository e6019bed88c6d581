"""Speculative decoding: ``draft="aux"`` (``--draft aux``) and ``--draft-model`` decode greedily to the
same tokens as plain greedy decoding, and an identical draft has every drafted token accepted."""

from __future__ import annotations

from pathlib import Path

import mlx_lm
import pytest

import kvp_mlx
from kvp_mlx.cli import main
from kvp_mlx.commands.generate import _load_draft
from kvp_mlx.errors import KVPError
from kvp_mlx.generation import encode_prompt, stream_generate
from kvp_mlx.model import load

DEMO_AUX = Path(kvp_mlx.__file__).parent / "default_model" / "aux"  # a plain mlx-lm directory
PROMPT = "def wrap(text, width=70):\n    lines = []\n    for word in text.split():\n"


def run(model, method: str, max_tokens: int, **kwargs) -> tuple[list[int], list[bool]]:
    rs = list(stream_generate(model, PROMPT, method=method, max_tokens=max_tokens, use_chat_template=False,
                              **kwargs))
    return [r.token for r in rs], [r.from_draft for r in rs]


def mlx_lm_greedy(model, max_tokens: int) -> list[int]:
    """mlx-lm's own greedy decoding of the base model (the reference for ``method="base"``)."""
    ids = encode_prompt(model, PROMPT, use_chat_template=False)
    return [r.token for r in mlx_lm.stream_generate(model.base, model.tokenizer, ids, max_tokens=max_tokens)]


def all_accepted(n: int, k: int) -> list[bool]:
    """mlx-lm's from_draft flags when every drafted token is accepted: k drafted, then one from the model
    (fewer drafted near ``max_tokens``)."""
    flags: list[bool] = []
    while len(flags) < n:
        drafted = min(n - len(flags), k)
        flags += [True] * drafted
        if len(flags) < n:
            flags.append(False)
    return flags


@pytest.mark.parametrize("arch", ["openelm", "llama", "qwen3"])
@pytest.mark.parametrize("method", ["kvp", "base"])
@pytest.mark.parametrize("k", [1, 3])
def test_identical_draft_is_exact_and_always_accepted(identity_dirs, arch, method, k):
    model = load(identity_dirs[arch])
    plain, plain_flags = run(model, method, 48)
    drafted, flags = run(model, method, 48, draft="aux", num_draft_tokens=k)
    assert drafted == plain
    assert not any(plain_flags)
    # aux is a copy of the base (and kvp's identity predictor gives the base its own cache): at temp 0
    # the verifier accepts every drafted token, so the flags follow mlx-lm's loop exactly.
    assert flags == all_accepted(len(flags), k)[: len(flags)]
    assert len(flags) > 2 * (k + 1)  # several verify steps ran (no early EOS)
    if method == "base":
        assert plain == mlx_lm_greedy(model, 48)


@pytest.fixture(scope="module")
def demo():
    return kvp_mlx.load()


@pytest.mark.parametrize("method", ["kvp", "base"])
def test_demo_model_draft_aux_is_exact(demo, method):
    plain, _ = run(demo, method, 60)
    assert len(plain) == 60  # the demo model does not stop early on this prompt
    drafted, flags = run(demo, method, 60, draft="aux")
    assert drafted == plain
    assert any(flags)  # the trained auxiliary's guesses are accepted at times
    if method == "base":
        assert plain == mlx_lm_greedy(demo, 60)


@pytest.mark.parametrize("method", ["kvp", "base"])
def test_demo_model_draft_model_directory(demo, method):
    """``--draft-model`` with the demo's aux/ folder (a plain mlx-lm directory, loaded as the CLI loads it)
    is the same draft as ``draft="aux"``: the same tokens and the same accepted tokens. For kvp this
    checks that the fill's reused auxiliary cache equals a fresh prefill of the draft."""
    draft_model = _load_draft(str(DEMO_AUX), demo)
    plain, _ = run(demo, method, 50)
    by_dir, dir_flags = run(demo, method, 50, draft_model=draft_model)
    by_aux, aux_flags = run(demo, method, 50, draft="aux")
    assert by_dir == plain == by_aux
    assert dir_flags == aux_flags


def cli_out(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["generate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 1, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("method", ["kvp", "base"])
def test_cli_draft_model_same_text(capsys, method):
    common = ["--prompt", PROMPT, "--ignore-chat-template", "--max-tokens", "40", "--quiet", "--method", method]
    rc, plain, _ = cli_out(capsys, *common)
    assert rc == 0 and plain.strip()
    rc, by_dir, _ = cli_out(capsys, *common, "--draft-model", str(DEMO_AUX), "--num-draft-tokens", "2")
    assert rc == 0 and by_dir == plain
    rc, by_aux, _ = cli_out(capsys, *common, "--draft", "aux")
    assert rc == 0 and by_aux == plain


def test_cli_draft_aux_errors(capsys, identity_dirs):
    rc, out, err = cli_out(capsys, "--model", str(DEMO_AUX), "--prompt", "x", "--draft", "aux")
    assert_one_line_error(rc, err, "--draft aux", "auxiliary")
    rc, out, err = cli_out(capsys, "--prompt", "x", "--draft", "aux", "--method", "aux")
    assert_one_line_error(rc, err, "--method aux")
    rc, out, err = cli_out(capsys, "--prompt", "x", "--draft", "aux", "--max-kv-size", "64")
    assert_one_line_error(rc, err, "trimmable", "--max-kv-size")
    rc, out, err = cli_out(capsys, "--prompt", "x", "--draft", "aux", "--draft-model", str(DEMO_AUX))
    assert_one_line_error(rc, err, "either")
    # gemma3's sliding-window layers (window 8 in the fixture) would wrap around while drafting
    gemma3 = ["--model", str(identity_dirs["gemma3"]), "--ignore-chat-template", "--draft", "aux", "--quiet"]
    rc, out, err = cli_out(capsys, *gemma3, "--prompt", PROMPT)  # the prompt alone fills the window
    assert_one_line_error(rc, err, "trimmable", "sliding")
    assert not out.strip()
    rc, out, err = cli_out(capsys, *gemma3, "--prompt", "ab", "--max-tokens", "20")  # decoding would wrap it
    assert_one_line_error(rc, err, "trimmable", "sliding window (8 tokens)")
    assert not out.strip()


def test_api_rejects_draft_with_max_kv_size(demo):
    with pytest.raises(KVPError, match="trimmable"):
        next(stream_generate(demo, PROMPT, draft="aux", max_kv_size=512))
