"""Small defects (issue 25): bad token ids, lone surrogates, decoding past the context, the server's
flags, headers, methods and stop strings, and the one-line errors of evaluate, conv-eval, convert
and the Python API. Each runs on the embedded demo model (256-token context) or tiny files."""

from __future__ import annotations

import http.client
import io
import json
import re
import sys
from contextlib import contextmanager

import mlx.core as mx
import pytest

from kvp_mlx.cli import main as kvp_main
from kvp_mlx.conversation.session import Session
from kvp_mlx.errors import KVPError
from kvp_mlx.generation import generate, stream_generate
from kvp_mlx.model import load
from kvp_mlx.server import KVPServer, ServerConfig


@pytest.fixture(scope="module")
def demo():
    return load()


def cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    """Exit code, the lines of stderr, stdout of ``kvp-mlx ARGV`` run in process."""
    capsys.readouterr()
    code = kvp_main(list(argv))
    out = capsys.readouterr()
    return code, [line for line in out.err.strip().splitlines() if line], out.out


def assert_one_line_error(code: int, err: list[str], *needles: str) -> None:
    assert code == 1, err
    errors = [line for line in err if not line.startswith(("note: ", "warning: "))]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    for needle in needles:
        assert needle in errors[0], errors[0]


# --- A: token ids --------------------------------------------------------------------------------

BAD_IDS = [
    ([999999], "token id 999999 is outside this model's vocabulary: token ids must lie in [0, 4096)"),
    ([1, 99999, 3], "token id 99999 is outside this model's vocabulary"),
    ([4096], "token id 4096 is outside this model's vocabulary"),
    ([-1], "token id -1 at position 0 is negative"),
    ([1, 2.0], "token ids must be integers, got 2.0 (float) at position 1"),
    ([True], "token ids must be integers, got True (bool) at position 0"),
    (["a"], "token ids must be integers, got 'a' (str) at position 0"),
    ([[1, 2]], "token ids must be integers, got [1, 2] (list) at position 0"),
    (mx.array([1.0, 2.0]), "token ids must be integers, got an array of float32"),
    ([2**40], "token id 1099511627776 at position 0 is too large to be a token id"),
]


@pytest.mark.parametrize("ids, message", BAD_IDS, ids=[repr(c) for c, _ in BAD_IDS])
def test_bad_token_ids_are_one_line_errors_on_every_road(demo, ids, message):
    with pytest.raises(KVPError, match="^" + re.escape(message)):
        generate(demo, ids, max_tokens=2)
    with pytest.raises(KVPError, match="token id"):
        list(stream_generate(demo, ids, max_tokens=2))
    session = Session(demo)
    with pytest.raises(KVPError, match="token id"):
        session.generate(ids, max_tokens=2)
    assert session.tokens == []
    if ids != [[1, 2]]:  # a valid batch for prefill
        with pytest.raises(KVPError, match="token id"):
            demo.prefill(ids)


def test_session_score_checks_the_last_token_and_the_continuation(demo):
    for prompt, continuation in (([1, 4096], [5]), ([1, 2], [4096]), ([1, 2], [-3])):
        with pytest.raises(KVPError, match="token id"):
            Session(demo).score(prompt, continuation)


def test_vocabulary_is_the_models_embedding(demo):
    """The last valid id works; the check reads the embedding's rows, not the tokenizer's size."""
    assert isinstance(generate(demo, [1, 4095], max_tokens=2), str)
    assert demo.prefill([[1, 4095]]).logits.shape == (1, 4096)


# --- B: lone surrogates --------------------------------------------------------------------------


def test_lone_surrogate_is_one_line(demo, capsys, monkeypatch):
    with pytest.raises(KVPError, match="the prompt is not valid Unicode text: a lone surrogate U.D800 at character 2"):
        generate(demo, "ab\ud800", max_tokens=2)
    with pytest.raises(KVPError, match="the content of message 0 is not valid Unicode text"):
        generate(demo, [{"role": "user", "content": "\udfff"}], max_tokens=2)
    with pytest.raises(KVPError, match="the prompt is not valid Unicode text"):
        Session(demo).generate("\ud800", max_tokens=2)  # raw text: the session's own rendering
    # the UTF-8 bytes of a surrogate on standard input
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi \xed\xa0\x80")))
    code, err, out = cli(capsys, "generate", "--prompt", "-", "--max-tokens", "2")
    assert_one_line_error(code, err, "standard input is not valid UTF-8: byte 0xed at byte offset 3")
    assert out == ""


# --- C: the context ------------------------------------------------------------------------------


def test_decoding_past_the_context_warns_once(demo, capsys):
    prompt = list(range(5, 250))  # 245 tokens of the 256-token context
    capsys.readouterr()
    generate(demo, prompt, max_tokens=20)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: decoding passed the model's context of 256 tokens (max_context_length) at "
                        "generated token 12; expect degraded output"], err
    Session(demo).generate(prompt, max_tokens=20)  # a session decodes in the same loop
    assert capsys.readouterr().err.count("decoding passed the model's context") == 1
    generate(demo, prompt, max_tokens=11)  # ends inside the context
    generate(demo, prompt, max_tokens=20, context_warning=False)
    assert "warning" not in capsys.readouterr().err


# --- the server ----------------------------------------------------------------------------------


@contextmanager
def serving(model, **config):
    server = KVPServer(model, ServerConfig(**{"model_id": "demo", "method": "kvp", **config}), "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.shutdown()


def request(server, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read()
        return response.status, json.loads(text) if text else None, response
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(demo):
    with serving(demo, api_key="sekret") as s:
        yield s


AUTH = {"Authorization": "Bearer sekret"}


def test_server_token_ids_and_surrogates_are_400(server):
    for prompt, message in [([1, 4096], "token id 4096 is outside this model's vocabulary"),
                            ([1, -1], "prompt: token id -1 at position 1 is negative"),
                            ([1.5], "prompt: token ids must be integers, got 1.5 (float)"),
                            ([True], "prompt: token ids must be integers, got True (bool)"),
                            ([[1, 2], 3], "'prompt' must be a non-empty string or a non-empty list of token ids")]:
        status, body, _ = request(server, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 3}, AUTH)
        assert status == 400 and message in body["error"]["message"], (prompt, body)
    status, body, _ = request(server, "POST", "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3}, AUTH)
    assert status == 200 and body["usage"]["prompt_tokens"] == 3
    raw = b'{"prompt": "\\ud800", "max_tokens": 3}'
    status, body, _ = request(server, "POST", "/v1/completions", headers=AUTH, raw=raw)
    assert status == 400 and body["error"]["message"] == (
        "prompt is not valid Unicode text: a lone surrogate U+D800 at character 0"), body
    raw = b'{"messages": [{"role": "user", "content": "a\\udc00"}], "max_tokens": 3}'
    status, body, _ = request(server, "POST", "/v1/chat/completions", headers=AUTH, raw=raw)
    assert status == 400 and "messages[0].content is not valid Unicode text" in body["error"]["message"], body


def test_server_default_max_tokens_fits_the_context(server):
    prompt = list(range(5, 205))  # 200 tokens: 56 left of the 256-token context
    status, body, _ = request(server, "POST", "/v1/completions", {"prompt": prompt, "method": "base"}, AUTH)
    assert status == 200 and 1 <= body["usage"]["completion_tokens"] <= 56, body
    status, body, _ = request(server, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 57}, AUTH)
    assert status == 400 and body["error"]["message"] == (
        "the prompt (200 tokens) plus max_tokens (57) exceed the model's context of 256 tokens (at most 56 fit)")
    status, body, _ = request(server, "POST", "/v1/completions", {"prompt": list(range(5, 261))}, AUTH)
    assert status == 400 and "leaves no room in the model's context of 256" in body["error"]["message"]


def test_server_auth_scheme_is_case_insensitive_and_other_methods_get_json(server):
    for scheme in ("Bearer", "bearer", "BEARER"):
        status, _, _ = request(server, "GET", "/v1/models", headers={"Authorization": f"{scheme} sekret"})
        assert status == 200, scheme
    for header in ("bearer wrong", "Basic sekret", "sekret", ""):
        status, body, _ = request(server, "GET", "/v1/models", headers={"Authorization": header})
        assert status == 401 and body["error"]["type"] == "authentication_error", header
    for method in ("PUT", "DELETE", "PATCH"):
        status, body, response = request(server, method, "/v1/completions", {"prompt": "hi"}, AUTH)
        assert status == 405 and response.getheader("Allow") == "GET, POST, OPTIONS"
        assert body["error"]["message"] == f"method {method} is not allowed: the API takes GET and POST"
    status, body, _ = request(server, "BREW", "/v1/completions", headers=AUTH)
    assert status == 501 and body["error"]["code"] == 501


def test_stop_strings_stop_where_they_occur(random_pair_dir):
    """A stop string ends the text where it first occurs (mlx-lm matched its token ids, which a
    whitespace stop string rarely equals, and deleted it from the text instead); sampled with a seed
    on a byte-level tokenizer, whose text holds newlines and spaces."""
    from kvp_mlx.server.worker import StopText

    with serving(load(random_pair_dir)) as s:
        nl, space = (s.model.tokenizer.encode(c, add_special_tokens=False)[-1] for c in "\n ")
        options = {"temperature": 1.0, "seed": 0, "logit_bias": {str(nl): 1.0, str(space): 1.0}}
        full, finish = stopped_text(s, options, None, False)
        assert finish == "length" and "\n" in full and " " in full, full
        for stop in ["\n", " ", "e", "ption", "\n   "]:
            for stream in (False, True):
                assert stopped_text(s, options, stop, stream) == (full.split(stop)[0], "stop"), (stop, stream)
    words = StopText(["ab", "\n"])
    assert words.feed("xa") == ("x", False) and words.feed("c") == ("ac", False)
    assert words.feed("a") == ("", False) and words.feed("b tail") == ("", True)
    assert StopText([" "]).feed("one two") == ("one", True)


def stopped_text(server, options: dict, stop: str | None, stream: bool) -> tuple[str, str]:
    body = {"method": "base", "prompt": "Once upon a time", "max_tokens": 40, "stream": stream, **options}
    if stop is not None:
        body["stop"] = stop
    if not stream:
        status, data, _ = request(server, "POST", "/v1/completions", body)
        assert status == 200, data
        return data["choices"][0]["text"], data["choices"][0]["finish_reason"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode())
        lines = conn.getresponse().read().decode().splitlines()
    finally:
        conn.close()
    chunks = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1]
    return text, finish


# --- D: serve's flags ----------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "--port must lie in [0, 65535] (0 picks a free port), got 99999"),
    (["--port", "-1"], "--port must lie in [0, 65535]"),
    (["--prompt-cache-size", "-1"], "--prompt-cache-size must be non-negative (0 keeps no sessions), got -1"),
    (["--max-tokens", "0"], "--max-tokens must be positive, got 0"),
])
def test_serve_flags_are_one_line_errors(capsys, flags, message):
    assert_one_line_error(*cli(capsys, "serve", *flags)[:2], message)


def test_serve_sizes_and_the_open_host_warning(capsys, monkeypatch):
    from kvp_mlx.commands.serve import is_loopback, parse_size
    import kvp_mlx.server

    assert [parse_size(s) for s in ("1KB", "1kb", "2GB", "500MB", "1.5G", "4096", "3 TB")] == [
        1000, 1000, 2 * 10**9, 500 * 10**6, 1500 * 10**6, 4096, 3 * 10**12]
    with pytest.raises(SystemExit):
        kvp_main(["serve", "--prompt-cache-bytes", "1PB"])
    assert "expected a size such as 2GB, 500MB or 1KB, got '1PB'" in capsys.readouterr().err
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.1.2.3"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.com"))

    def no_bind(*args, **kwargs):
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(kvp_mlx.server, "KVPServer", no_bind)
    code, err, _ = cli(capsys, "serve", "--host", "0.0.0.0", "--prompt-cache-size", "0")
    assert err[0] == ("warning: serving on 0.0.0.0 without --api-key: anyone who can reach this address can use "
                      "the model"), err
    assert_one_line_error(code, err, "cannot listen on 0.0.0.0:8080: Address already in use")
    code, err, _ = cli(capsys, "serve", "--host", "0.0.0.0", "--api-key", "k")
    assert not [line for line in err if line.startswith("warning:")]


# --- I: an interrupted benchmark keeps what finished ----------------------------------------------


def test_interrupted_benchmark_writes_what_finished(random_pair_dir, tmp_path, monkeypatch, capsys):
    import bench.cases
    from bench.ttft import main as ttft_main

    real, calls = bench.cases.benchmark_config, []

    def second_interrupts(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench.cases, "benchmark_config", second_interrupts)
    argv = ["--model", str(random_pair_dir), "--prompt-lengths", "6,9", "--repetitions", "1", "--warmup", "1",
            "--prefill-step-size", "4", "--out", str(tmp_path), "--name", "cut", "--no-calibrate"]
    assert ttft_main(argv) == 130
    result = json.loads((tmp_path / "cut.json").read_text())
    assert result["interrupted"] is True and [r["prompt_tokens"] for r in result["runs"]] == [6]
    assert (tmp_path / "cut.md").read_text().startswith("**interrupted**: only the 1 configuration(s) that finished")
    (tmp_path / "afile").write_text("")
    assert ttft_main([*argv[:-5], "--out", str(tmp_path / "afile")]) == 1
    assert "--out " + str(tmp_path / "afile") + " is a file, not a directory" in capsys.readouterr().err


# --- F, G, K: conv-eval, convert and output paths -------------------------------------------------


def test_conv_eval_data_dir_formats_and_default_model(tmp_path, capsys):
    code, err, _ = cli(capsys, "conv-eval", "--data", str(tmp_path), "--format", "synthetic", "--policy", "full")
    assert_one_line_error(code, err, f"{tmp_path} is a directory: give one conversation file (--data FILE)")
    with pytest.raises(SystemExit):
        kvp_main(["conv-eval", "--help"])
    help_text = capsys.readouterr().out
    for name in ("locomo", "longmemeval", "realtalk", "synthetic"):
        assert f"\n  {name}: " in help_text
    assert '"sessions": [{"date"?, "turns": [{"speaker", "text"}]}]' in help_text
    assert "default: the embedded demo model" in " ".join(help_text.split())
    data = tmp_path / "conv.json"
    data.write_text(json.dumps([{"id": "c", "sessions": [{"turns": [
        {"speaker": "Ann", "text": "My cat is called Tom."}, {"speaker": "Bob", "text": "Nice."}]}],
        "qa": [{"question": "What is the cat called?", "answer": "Tom"}]}]))
    (tmp_path / "out").mkdir()
    code, err, _ = cli(capsys, "conv-eval", "--data", str(data), "--format", "synthetic", "--policy", "full",
                       "--json", str(tmp_path / "out"))
    assert_one_line_error(code, err, f"--json {tmp_path / 'out'} is a directory, not a file")
    code, err, out = cli(capsys, "conv-eval", "--data", str(data), "--format", "synthetic", "--policy", "full",
                         "--max-tokens", "2", "--json", str(tmp_path / "r.json"))
    assert code == 0 and "questions 1" in out and json.loads((tmp_path / "r.json").read_text())["results"]


def test_convert_directories_are_one_line_errors(tmp_path, capsys):
    ckpt, config = tmp_path / "c.pt", tmp_path / "c.yaml"
    ckpt.write_text("")
    config.write_text("")
    for argv, message in [
        (["--checkpoint", str(tmp_path), "--config", str(config)],
         f"--checkpoint {tmp_path} is a directory, not a file"),
        (["--checkpoint", str(ckpt), "--config", str(tmp_path)], f"--config {tmp_path} is a directory, not a file"),
        (["--checkpoint", str(ckpt), "--config", str(config), "--tokenizer", str(tmp_path)],
         f"--tokenizer {tmp_path} is a directory, not a file"),
    ]:
        assert_one_line_error(*cli(capsys, "convert", *argv, "--out", str(tmp_path / "o"))[:2], message)
    code, err, _ = cli(capsys, "convert", "--checkpoint", str(ckpt), "--config", str(config), "--out", str(ckpt))
    assert_one_line_error(code, err, f"--out {ckpt} is a file, not a directory")
    code, err, _ = cli(capsys, "convert", "--checkpoint", str(ckpt), "--config", str(config), "--out",
                       str(ckpt / "sub"))
    assert_one_line_error(code, err, f"--out {ckpt / 'sub'}: {ckpt} is a file, not a directory")


# --- H, J: the Python API and --seed ------------------------------------------------------------


def test_api_arguments_of_the_wrong_kind(demo, capsys):
    with pytest.raises(KVPError, match=r"^model must be a KVPModel from kvp_mlx.load\(...\), got str$"):
        generate("notamodel", "hi")
    with pytest.raises(KVPError, match=r"^model must be a KVPModel from kvp_mlx.load\(...\), got NoneType$"):
        Session(None)
    with pytest.raises(KVPError, match="^load takes a path or repo id, got int$"):
        load(123)
    with pytest.raises(KVPError, match=r"^unknown keyword 'max_token' \(did you mean 'max_tokens'\?\)"):
        generate(demo, "hi", max_token=3)
    with pytest.raises(KVPError, match=r"^unknown keyword 'tmep' \(did you mean 'temp'\?\)"):
        Session(demo).generate("hi", tmep=0.5)
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(KVPError, match="^seed must be a non-negative integer below 2\\*\\*64"):
            generate(demo, "hi", seed=seed, max_tokens=2)
    code, err, out = cli(capsys, "generate", "--prompt", "hi", "--seed", "-1", "--temp", "1")
    assert_one_line_error(code, err, "seed must be a non-negative integer below 2**64, got -1")
    assert out == ""
    assert isinstance(generate(demo, "hi", seed=2**64 - 1, temp=1.0, max_tokens=2), str)
