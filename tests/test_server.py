"""`kvp-mlx serve` driven over loopback by the real `openai` client: the text of `generate`,
multi-turn prefix reuse equal to mlx-lm, concurrent load, hostile bodies, disconnects, idle repair."""

from __future__ import annotations

import gc
import http.client
import json
import shutil
import socket
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

openai = pytest.importorskip("openai")

import kvp_mlx  # noqa: E402
from kvp_mlx.generation import generate  # noqa: E402
from kvp_mlx.model import load  # noqa: E402
from kvp_mlx.server import KVPServer, ServerConfig  # noqa: E402
from kvp_mlx.conversation.session import Session  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL_ID = "test-model"


@pytest.fixture(scope="module")
def chat_identity_dir(identity_dirs, tmp_path_factory) -> Path:
    """The llama identity fixture (aux = copy of base, identity predictor) with a chat template."""
    dst = tmp_path_factory.mktemp("serve-identity") / "llama"
    shutil.copytree(identity_dirs["llama"], dst)
    for part in ("base", "aux"):
        path = dst / part / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": CHAT_TEMPLATE}))
    return dst


@contextmanager
def serving(model, **config):
    config = {"model_id": MODEL_ID, "method": "kvp", **config}
    server = KVPServer(model, ServerConfig(**config), "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.shutdown()
        assert not server.worker.alive


def client(server, api_key: str = "unused", **kw) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=api_key, max_retries=0,
                         timeout=120, **kw)


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_idle(server, timeout: float = 120) -> None:
    assert server.worker.idle.wait(timeout), "the worker did not become idle"


def healthy(server) -> bool:
    status, body = raw(server, "GET", "/health")
    return status == 200 and json.loads(body)["status"] == "ok"


def stream_text(stream) -> tuple[str, object]:
    text, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text.append(piece or "")
    return "".join(text), usage


# --- the text of generate ---------------------------------------------------------------------------


def cli_text(capsys, *argv: str) -> str:
    """What `kvp-mlx generate --quiet` prints (the text alone), run in process."""
    from kvp_mlx.cli import main as kvp_main

    capsys.readouterr()
    assert kvp_main(["generate", "--quiet", *argv]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_openai_client_gets_the_text_of_generate(chat_identity_dir, capsys):
    """Greedy, streaming and not: completions on the trained demo model (kvp, a real predictor) and
    chat on a model with a chat template equal kvp_mlx.generate for the same prompt and options."""
    demo = kvp_mlx.load()
    prompt = "def fibonacci(n):\n    if n < 2:"
    want = generate(demo, prompt, use_chat_template=False, max_tokens=24)
    assert cli_text(capsys, "--prompt", prompt, "--max-tokens", "24") == want  # the kvp-mlx generate command
    with serving(demo, repair=False) as server:
        c = client(server)
        got = c.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == want and got.usage.completion_tokens == 24
        assert got.usage.model_extra["prefill"]["method"] == "kvp"
        assert got.usage.model_extra["prefill"]["ttft_s"] > 0
        text, usage = stream_text(c.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=24, stream=True,
                                                       stream_options={"include_usage": True}))
        assert text == want and usage.prompt_tokens == got.usage.prompt_tokens
        assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # the whole prompt was cached
        base = c.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=24, extra_body={"method": "base"})
        assert base.choices[0].text == generate(demo, prompt, use_chat_template=False, max_tokens=24, method="base")
        assert base.usage.model_extra["prefill"]["method"] == "base"
        # a stop word (mlx-lm matches its tokens): a generated token that encodes to itself
        tokens = [e["id"] for e in c.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=24, logprobs=True)
                  .choices[0].logprobs.model_dump()["content"]]
        tok = demo.tokenizer
        word = next(w for w in (tok.decode([t]) for t in tokens[4:]) if w.strip() and
                    tok.encode(w, add_special_tokens=False) == tok.encode(w, add_special_tokens=False)[:1])
        stopped = c.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=24, stop=[word])
        assert stopped.choices[0].finish_reason == "stop", word
        assert want.startswith(stopped.choices[0].text) and len(stopped.choices[0].text) < len(want)
    model = load(chat_identity_dir)
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    want = generate(model, messages, max_tokens=16)
    assert cli_text(capsys, "--model", str(chat_identity_dir), "--prompt", messages[0]["content"],
                    "--max-tokens", "16") == want
    with serving(model) as server:
        c = client(server)
        got = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=16)
        assert got.choices[0].message.content == want
        text, _ = stream_text(c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=16,
                                                        stream=True))
        assert text == want
        assert [m.id for m in c.models.list().data] == [MODEL_ID]


# --- multi-turn prefix reuse -------------------------------------------------------------------------


TURNS = ["Write a function that adds two numbers.", "Now make it multiply.", "Add a docstring, please."]


def test_multi_turn_reuses_the_prefix_and_equals_mlx_lm(chat_identity_dir):
    """Three turns, the whole history sent each time: every turn's tokens equal mlx-lm's greedy
    generation from scratch on the same conversation, its replies as their generated ids (kvp on the
    identity fixture is exact), and cached_tokens is the previous turn's prompt and reply."""
    model = load(chat_identity_dir)
    ref_model, tokenizer = mlx_lm.load(str(chat_identity_dir / "base"))
    messages: list[dict] = []
    held: list[int] = []
    with serving(model) as server:
        c = client(server)
        for turn, message in enumerate(TURNS):
            messages.append({"role": "user", "content": message})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if turn:  # the server puts its replies' own ids back (their text re-tokenizes otherwise)
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                reply = messages[-2]["content"]
                ids = held + tokenizer.encode(text[text.rindex(reply) + len(reply):], add_special_tokens=False)
            reference = [r.token for r in mlx_lm.stream_generate(ref_model, tokenizer, ids, max_tokens=12,
                                                                 prompt_cache=make_prompt_cache(ref_model))]
            got = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, logprobs=True)
            tokens = [entry["id"] for entry in got.choices[0].logprobs.model_dump()["content"]]
            assert tokens == reference, f"turn {turn}"
            cached = got.usage.prompt_tokens_details.cached_tokens
            assert got.usage.prompt_tokens == len(ids)
            if turn == 0:
                assert cached == 0
            else:
                assert cached == len(held)  # the previous prompt and reply, all of it
            held = ids + tokens  # the session's cache: the prompt and the whole reply (mlx-lm's loop feeds each token)
            messages.append({"role": "assistant", "content": got.choices[0].message.content})
            wait_idle(server)  # an idle repair runs in between (exact here: the identity fixture)


# --- load ----------------------------------------------------------------------------------------------


SHARED = "You are a careful assistant. " * 20


def test_concurrent_load_all_answered_correctly(chat_identity_dir):
    """16 clients x 5 requests (mixed streaming, chat and completions, prompts sharing a long prefix)
    against a small session cache: all answered with mlx-lm's greedy text, none lost; memory after
    the load within 10% of memory after a warm-up; the server healthy after."""
    model = load(chat_identity_dir)
    ref_model, tokenizer = mlx_lm.load(str(chat_identity_dir / "base"))
    prompts = [f"{SHARED}Question {i}: what is {i} + {i}?" for i in range(8)]
    expected = {}
    for p in prompts:
        for kind in ("text", "chat"):
            ids = (tokenizer.encode(p) if kind == "text"
                   else tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
            expected[kind, p] = mlx_lm.generate(ref_model, tokenizer, ids, max_tokens=8)

    def ask(c, i: int, j: int) -> tuple[str, str, float, float, str]:
        p = prompts[(i + j) % len(prompts)]
        kind = "chat" if (i + j) % 2 else "text"
        stream = (i * 5 + j) % 3 != 0
        tic = time.perf_counter()
        ttft = None
        if kind == "chat":
            args = dict(model=MODEL_ID, messages=[{"role": "user", "content": p}], max_tokens=8)
            if stream:
                pieces = []
                for chunk in c.chat.completions.create(stream=True, **args):
                    if chunk.choices and chunk.choices[0].delta.content:
                        ttft = ttft or time.perf_counter() - tic
                        pieces.append(chunk.choices[0].delta.content)
                text = "".join(pieces)
            else:
                text = c.chat.completions.create(**args).choices[0].message.content or ""
        else:
            args = dict(model=MODEL_ID, prompt=p, max_tokens=8)
            if stream:
                pieces = []
                for chunk in c.completions.create(stream=True, **args):
                    if chunk.choices and chunk.choices[0].text:
                        ttft = ttft or time.perf_counter() - tic
                        pieces.append(chunk.choices[0].text)
                text = "".join(pieces)
            else:
                text = c.completions.create(**args).choices[0].text
        total = time.perf_counter() - tic
        return kind, p, ttft if ttft is not None else total, total, text

    with serving(model, prompt_cache_size=6) as server:
        c = client(server)
        for j in range(16):  # warm-up: the session cache fills up to its limit
            ask(c, j, 0)
        wait_idle(server)
        gc.collect()
        warm_memory = mx.get_active_memory()
        results: list = []
        errors: list = []

        def run_client(i: int) -> None:
            own = client(server)
            for j in range(5):
                try:
                    results.append(ask(own, i, j))
                except Exception as e:  # recorded, then asserted: a lost request fails the test
                    errors.append(repr(e))

        threads = [threading.Thread(target=run_client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors and len(results) == 80
        for kind, p, _, _, text in results:
            assert text == expected[kind, p], (kind, p)
        wait_idle(server)
        gc.collect()
        after_memory = mx.get_active_memory()
        assert after_memory <= 1.1 * warm_memory, (after_memory, warm_memory)
        assert healthy(server) and server.worker.stats.failed == 0
        ttfts = sorted(r[2] for r in results)
        totals = sorted(r[3] for r in results)
        print(f"\nload 16x5: TTFT p50 {statistics.median(ttfts):.3f} s p95 {ttfts[int(0.95 * 79)]:.3f} s; "
              f"total p50 {statistics.median(totals):.3f} s p95 {totals[int(0.95 * 79)]:.3f} s; "
              f"memory after warm-up {warm_memory / 1e6:.1f} MB, after load {after_memory / 1e6:.1f} MB")


# --- faults --------------------------------------------------------------------------------------------


def fuzz_bodies() -> list[tuple[str, bytes, dict]]:
    """200 malformed or hostile requests: (path, body, extra headers)."""
    chat, text = "/v1/chat/completions", "/v1/completions"
    ok_chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}
    ok_text = {"model": MODEL_ID, "prompt": "hi"}
    cases: list[tuple[str, bytes, dict]] = []
    for junk in [b"", b"{", b"}", b"nul", b"{'a': 1}", b"\xff\xfe\x00", b"[1, 2", b'{"messages": }', b"NaN",
                 b'"just a string"', b"[]", b"null", b"42", b"true", b"[" * 100000 + b"]" * 100000,
                 b'{"a":' * 5000 + b"1" + b"}" * 5000, b"\x00" * 64, "é".encode("latin-1")]:
        cases += [(chat, junk, {}), (text, junk, {})]
    invalid = {  # field -> values that are wrong for it
        "max_tokens": ["x", -1, 0, 1.5, True, [], {}, 1e308, "NaN"],
        "temperature": ["x", -1, [], {}, "NaN", [1], -1e9],
        "top_p": ["x", -1, 1.5, [], {}, 1e308, -1e9],
        "top_k": ["x", -1, 1.5, True, [], {}],
        "min_p": ["x", -1, 1.5, [], 1e308],
        "stream": ["x", -1, 0, 1.5, [], {}],
        "logprobs": ["x", -1, 0, 1.5, [], {}],
        "top_logprobs": ["x", -2, 1.5, True, [], 11, 100],
        "seed": ["x", -1, 1.5, True, [], {}],
        "repetition_penalty": ["x", -1, [], {}, "NaN"],
        "logit_bias": ["x", -1, 1.5, [1], {"a": 1}, {"1": "x"}, {"999999": 1}],
        "stop": [-1, 1.5, [1], {"a": 1}, [""], ["x"] * 20],
        "method": ["x", -1, [], {}, "lazy", "../kvp"],
        "xtc_probability": ["x", -1, 1.5, []],
        "n": ["x", 0, 2, 1.5, True],
        "stream_options": ["x", 1, [], {"include_usage": "yes"}],
        "presence_context_size": ["x", 0, -1, 1.5, True],
        "frequency_penalty": ["x", [], {}],
        "chat_template_kwargs": ["x", 1, []],
    }
    for name, values in invalid.items():
        for value in values:
            cases.append((chat, json.dumps({**ok_chat, name: value}).encode(), {}))
    for messages in [None, [], "hi", [1], [{}], [{"role": "user"}], [{"role": "wizard", "content": "x"}],
                     [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url"}]}],
                     [{"role": ["user"], "content": "x"}]]:
        cases.append((chat, json.dumps({"model": MODEL_ID, "messages": messages}).encode(), {}))
    for prompt in [None, "", 5, ["a", 1], {"a": 1}]:  # ["a"]: a list of strings, OpenAI's batch
        cases.append((text, json.dumps({**ok_text, "prompt": prompt}).encode(), {}))
    for model_name in ["../../etc/passwd", "/etc/passwd", "other-model", "", "~/.ssh/id_rsa", "x" * 5000, 5,
                       "file:///etc/passwd"]:
        cases.append((chat, json.dumps({**ok_chat, "model": model_name}).encode(), {}))
    long_prompt = "word " * 5000  # more tokens than the model's context
    cases.append((text, json.dumps({**ok_text, "prompt": long_prompt}).encode(), {}))
    cases.append((chat, json.dumps({**ok_chat, "max_tokens": 10**12}).encode(), {}))
    cases.append((chat, json.dumps({**ok_chat, "max_tokens": 2047}).encode(), {}))  # prompt + max_tokens > context
    cases.append((chat, json.dumps({**ok_chat, "tools": [{"type": "function"}]}).encode(), {}))
    for path in ["/v1/../../etc/passwd", "/v2/chat/completions", "/", "/v1/models"]:
        cases.append((path, json.dumps(ok_chat).encode(), {}))
    while len(cases) < 200:  # wrong types nested in the sampling options
        k = len(cases)
        cases.append((text, json.dumps({**ok_text, "logit_bias": {f"t{k}": 1}}).encode(), {}))
    return cases[:200]


def test_hostile_bodies_get_4xx_and_the_server_lives(chat_identity_dir):
    model = load(chat_identity_dir)  # a llama config: its context (2048) is known
    cases = fuzz_bodies()
    assert len(cases) == 200
    with serving(model, api_key="s3cret") as server:
        auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
        statuses = []
        for path, body, headers in cases:
            status, payload = raw(server, "POST", path, body, {**auth, **headers})
            statuses.append(status)
            assert 400 <= status < 500, (path, body[:80], status, payload[:200])
            assert "error" in json.loads(payload)
        # no Content-Length; a negative and a lying one
        conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n")
        assert conn.recv(100).split(b" ")[1] == b"411"
        conn.close()
        assert raw(server, "POST", "/v1/completions", b"{}", {**auth, "Content-Length": "-5"})[0] == 400
        conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)  # a body over the limit
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                     b"Content-Length: %d\r\n\r\n" % (9 << 20))
        assert conn.recv(100).split(b" ")[1] == b"413"
        conn.close()
        # the API key
        assert raw(server, "POST", "/v1/completions", json.dumps({"prompt": "hi"}).encode())[0] == 401
        assert raw(server, "GET", "/v1/models")[0] == 401
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").completions.create(model=MODEL_ID, prompt="hi", max_tokens=2)
        good = client(server, api_key="s3cret").completions.create(model=MODEL_ID, prompt="hi", max_tokens=2)
        assert good.usage.completion_tokens >= 1
        assert healthy(server) and server.worker.stats.failed == 0
        assert statuses.count(404) >= 10 and statuses.count(400) >= 150


def test_server_binds_to_loopback_by_default():
    from kvp_mlx.cli import build_parser

    args = build_parser("serve").parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.repair == "idle"


def test_disconnecting_clients_stop_their_generation(random_pair_dir):
    """10 streaming clients hang up after two chunks: their generation stops long before max_tokens,
    and later requests are served normally."""
    model = load(random_pair_dir)
    eos = list(model.tokenizer.eos_token_ids)
    max_tokens = 1500
    body = json.dumps({"model": MODEL_ID, "prompt": "Tell me a long story", "max_tokens": max_tokens,
                       "stream": True, "logit_bias": {str(t): -100 for t in eos}}).encode()
    with serving(model, repair=False) as server:
        for _ in range(10):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            received = b""
            while received.count(b"data: ") < 2:
                received += conn.recv(4096)
            assert received.startswith(b"HTTP/1.0 200")
            conn.close()
        after = client(server).completions.create(model=MODEL_ID, prompt="hello", max_tokens=5)
        assert after.usage.completion_tokens == 5
        wait_idle(server)
        jobs = server.worker.stats.jobs
        stopped = [j.generated for j in jobs[:10]]
        print(f"\ndisconnects: tokens generated per dropped stream {stopped} (max_tokens {max_tokens})")
        assert all(n < max_tokens // 4 for n in stopped), stopped
        assert server.worker.stats.cancelled == 10
        assert healthy(server)


# --- idle repair -----------------------------------------------------------------------------------


def test_idle_repair_makes_held_sessions_exact_and_yields_to_requests():
    """The demo model (an inexact predictor): after an idle period every session the server holds
    has no predicted positions and its next-token log-probs equal a base session's within 1e-4;
    a request arriving during a repair waits for at most the chunk in flight."""
    demo = kvp_mlx.load()
    code = Path(kvp_mlx.__file__).parent.joinpath("conversation", "session.py").read_text()
    long_prompt, other = code[:620], code[620:800]  # within the demo model's 256-token context
    with serving(demo, repair_step_size=8, prefill_step_size=64) as server:
        c = client(server)
        c.completions.create(model=MODEL_ID, prompt=long_prompt, max_tokens=4)
        second = c.completions.create(model=MODEL_ID, prompt=other, max_tokens=4)  # arrives during the repair
        assert second.usage.completion_tokens == 4
        wait_idle(server)
        stats = server.worker.stats
        job = stats.jobs[-1]
        during = [t for t in stats.repair_boundaries if job.enqueued < t < job.started]
        assert stats.repairs_interrupted >= 1 and len(during) <= 1, (stats.repairs_interrupted, len(during))
        sessions = list(server.worker.cache.most_recent_first())
    assert len(sessions) == 2 and stats.repaired_positions > 0
    probe = demo.tokenizer.encode(" x", add_special_tokens=False)[-1:]
    for session in sessions:
        assert not session.predicted
        base = Session(demo, method="base")
        base.prefill(list(session.tokens))
        exact = np.array(list(base.stream_generate(probe, max_tokens=1))[0].logprobs)
        held = np.array(list(session.stream_generate(probe, max_tokens=1))[0].logprobs)
        assert float(np.abs(held - exact).max()) <= 1e-4
