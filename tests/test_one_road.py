"""One road into a method: every caller (the CLI, generate, stream_generate, Session, the server)
enters a method through kvp_mlx.methods.enter, so a method the model cannot run is one line
everywhere, a misspelt keyword is named as such, and a method registered by a user is reached by
every caller."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

import kvp_mlx
from kvp_mlx.conversation.session import Session
from kvp_mlx.errors import KVPError
from kvp_mlx.generation import generate, stream_generate
from kvp_mlx.methods import Capabilities, FilledCache, PrefillMethod, get_method, register, unregister
from kvp_mlx.model import load
from conftest import post_completion
from kvp_mlx.server import KVPServer, ServerConfig

BASE_ONLY = Path(kvp_mlx.__file__).parent / "default_model" / "base"  # a plain mlx-lm directory
PROMPT = "the cat sat on the"


@pytest.fixture(scope="module")
def base_only():
    model = load(BASE_ONLY)
    assert model.aux is None and model.predictor is None
    return model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvp_mlx.cli", *args], capture_output=True, text=True, input="",
                          timeout=300)


@contextmanager
def serving(model, method: str = "base"):
    server = KVPServer(model, ServerConfig(model_id="m", method=method), "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.shutdown()




# --- a method the directory cannot run --------------------------------------------------------------


@pytest.mark.parametrize("command, method", [("generate", "kvp"), ("generate", "aux"), ("chat", "kvp"),
                                             ("cache-prompt", "aux")])
def test_cli_refuses_a_method_of_a_base_only_directory_in_one_line(command, method, tmp_path):
    args = ["--model", str(BASE_ONLY), "--method", method]
    if command != "chat":
        args += ["--prompt", PROMPT]
    if command == "cache-prompt":
        args += ["--prompt-cache-file", str(tmp_path / "s.safetensors")]
    proc = run_cli(command, *args)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert f"method '{method}'" in errors[0] and "base-only" in errors[0] and "--method base" in errors[0]
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("method", ["kvp", "aux"])
def test_api_refuses_a_method_of_a_base_only_model(base_only, method):
    with pytest.raises(KVPError, match=f"method '{method}' needs an auxiliary model.*base-only"):
        generate(base_only, PROMPT, method=method, max_tokens=2)
    with pytest.raises(KVPError, match=f"method '{method}' needs an auxiliary model.*base-only"):
        next(stream_generate(base_only, PROMPT, method=method, max_tokens=2))
    with pytest.raises(KVPError, match=f"method '{method}' needs an auxiliary model.*base-only"):
        Session(base_only, method=method)


def test_server_refuses_a_request_for_a_method_the_model_cannot_run(base_only):
    with serving(base_only) as server:
        status, body = post_completion(server, {"prompt": PROMPT, "max_tokens": 2, "method": "kvp"})
        assert status == 400
        message = body["error"]["message"]
        assert "method 'kvp' needs an auxiliary model" in message and "base-only" in message
        assert "\n" not in message
        status, _ = post_completion(server, {"prompt": PROMPT, "max_tokens": 2, "method": "base"})
        assert status == 200  # the server still serves what it can


# --- generation keywords -----------------------------------------------------------------------------


def test_a_misspelt_generation_keyword_is_named_as_such(base_only):
    with pytest.raises(KVPError, match=r"unknown keyword 'max_tokenz' \(did you mean 'max_tokens'\?\)") as err:
        generate(base_only, PROMPT, max_tokenz=3)
    assert "generation keywords:" in str(err.value) and "has no option 'max_tokenz'" not in str(err.value)
    with pytest.raises(KVPError, match="unknown keyword 'max_tokenz'"):
        Session(base_only).generate(PROMPT, max_tokenz=3)
    # a real option of the method still works, and a wrong value of it blames the option
    assert isinstance(generate(base_only, PROMPT, method="rp", keep=1.0, max_tokens=2), str)
    with pytest.raises(KVPError, match="option 'keep' of method 'rp'"):
        generate(base_only, PROMPT, method="rp", keep=2.0, max_tokens=2)


# --- a method registered by a user -------------------------------------------------------------------


CALLS: list[int] = []


def fill_counted(model, tokens, prefill_step_size=2048, max_kv_size=None, warm: FilledCache | None = None):
    """base's fill, counting the calls and the tokens it was given."""
    CALLS.append(int(tokens.shape[1]))
    fill = get_method("base").fill
    assert fill is not None
    return fill(model, tokens, prefill_step_size=prefill_step_size, max_kv_size=max_kv_size, warm=warm)


@pytest.fixture()
def counted():
    register(PrefillMethod(name="counted", summary="base, counted", fill=fill_counted,
                           capabilities=Capabilities(extends_cache=True)))
    CALLS.clear()
    yield "counted"
    unregister("counted")


def test_a_registered_method_is_reached_by_generate(base_only, counted):
    reference = generate(base_only, PROMPT, method="base", max_tokens=8)
    assert generate(base_only, PROMPT, method=counted, max_tokens=8) == reference
    assert len(CALLS) == 1 and CALLS[0] > 0
    pieces = list(stream_generate(base_only, PROMPT, method=counted, max_tokens=8))
    assert "".join(p.text for p in pieces) == reference and pieces[-1].method == counted
    assert len(CALLS) == 2


def test_a_registered_method_is_reached_by_a_session(base_only, counted):
    base, ours = Session(base_only, method="base"), Session(base_only, method=counted)
    assert ours.method == counted
    for turn in (PROMPT, "and then the dog"):
        assert ours.generate(turn, max_tokens=6) == base.generate(turn, max_tokens=6)
    assert ours.tokens == base.tokens
    assert len(CALLS) == 3  # the empty cache at construction, then one fill per turn
    assert CALLS[2] > CALLS[1] > 0  # a warm turn is given the whole history and extends the cache


def test_a_registered_method_is_reached_by_a_server_request(base_only, counted):
    with serving(base_only) as server:
        status, base = post_completion(server, {"prompt": PROMPT, "max_tokens": 6, "method": "base"})
        assert status == 200
        assert not CALLS
        status, ours = post_completion(server, {"prompt": PROMPT, "max_tokens": 6, "method": counted})
        assert status == 200, ours
        assert CALLS and ours["choices"][0]["text"] == base["choices"][0]["text"]
