"""Continuous batching (`kvp-mlx serve --decode-concurrency N`): requests decoding together in
mlx-lm's BatchGenerator get exactly the tokens they get alone (greedy, on the identity fixture where
kvp equals base), for kvp and base; 16 concurrent clients are all answered correctly; finished
sequences go back to the prefix cache; requests that cannot batch are served alone."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from kvp_mlx.model import load  # noqa: E402
from kvp_mlx.server import KVPServer, ServerConfig  # noqa: E402

MODEL_ID = "test-model"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def identity_model(identity_dirs, tmp_path_factory):
    import json

    dst = tmp_path_factory.mktemp("batch-identity") / "llama"
    shutil.copytree(identity_dirs["llama"], dst)
    for part in ("base", "aux"):
        path = dst / part / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": CHAT_TEMPLATE}))
    return load(Path(dst))


def serving(model, **config):
    """A server; one request at a time unless ``decode_concurrency`` says otherwise (the default batches)."""
    config = {"model_id": MODEL_ID, "method": "kvp", "repair": False, "decode_concurrency": 1, **config}
    return KVPServer(model, ServerConfig(**config), "127.0.0.1", 0).start()


def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=120)


PROMPTS = [("Hi" if i == 0 else f"Request {i}: " + "tell me more about the number %d. " % i * (1 + 2 * i))
           for i in range(8)]
MAX_TOKENS = [4 + 3 * i for i in range(8)]  # mixed lengths: sequences finish and leave the batch at different steps


def ask(c, i: int, method: str, kind: str) -> tuple[list[int], str]:
    """(the reply's token ids, its text), greedy."""
    extra = {"method": method}
    if kind == "chat":
        r = c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": PROMPTS[i]}],
                                      max_tokens=MAX_TOKENS[i], temperature=0, logprobs=True, extra_body=extra)
        return [t.model_extra["id"] for t in r.choices[0].logprobs.content], r.choices[0].message.content or ""
    r = c.completions.create(model=MODEL_ID, prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i], temperature=0,
                             extra_body=extra)
    return [], r.choices[0].text


def concurrently(server, n: int, fn) -> list:
    results: list = [None] * n
    errors: list = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(client(server), i)
        except Exception as e:  # asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


@pytest.mark.parametrize("method", ["kvp", "base"])
def test_batched_decoding_is_exact(identity_model, method):
    """8 mixed-length requests sent together decode in one batch, each getting exactly the tokens it
    gets served alone (the one-at-a-time server, a fresh one each so no cache is shared)."""
    alone = []
    for i in range(8):
        server = serving(identity_model, prompt_cache_size=0)
        try:
            alone.append(ask(client(server), i, method, "chat"))
        finally:
            server.shutdown()
    server = serving(identity_model, decode_concurrency=8, prompt_concurrency=2)
    try:
        got = concurrently(server, 8, lambda c, i: ask(c, i, method, "chat"))
        assert server.worker.stats.failed == 0
        widest = server.worker.stats.widest_batch
        assert widest >= 4, widest  # they did decode together
    finally:
        server.shutdown()
    for i in range(8):
        assert got[i][0] == alone[i][0], i
        assert got[i][1] == alone[i][1], i
        assert len(got[i][0]) >= 1


def test_sixteen_concurrent_clients_all_answered(identity_model):
    """16 clients at once, chat and completions, kvp and base, streaming or not, with 8 decoding
    together: every answer equals the one-at-a-time server's; then resent prompts hit the cache."""
    def job(i: int) -> tuple[int, str, str]:
        return i % 8, ("kvp", "base")[i % 2], ("chat", "text")[(i // 2) % 2]

    server = serving(identity_model)
    try:
        c = client(server)
        want = {job(i): ask(c, *job(i)) for i in range(16)}
    finally:
        server.shutdown()
    server = serving(identity_model, decode_concurrency=8)
    try:
        got = concurrently(server, 16, lambda c, i: ask(c, *job(i)))
        for i in range(16):
            assert got[i] == want[job(i)], job(i)
        assert server.worker.stats.widest_batch >= 4, server.worker.stats.widest_batch
        assert server.worker.stats.failed == 0 and server.worker.stats.served == 16
        # a chat request sent again reuses its cached session (the batched reply went back to the cache)
        c = client(server)
        r = c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": PROMPTS[4]}],
                                      max_tokens=MAX_TOKENS[4], temperature=0, extra_body={"method": "kvp"})
        assert r.usage.prompt_tokens_details.cached_tokens > 0
        assert r.choices[0].message.content == want[(4, "kvp", "chat")][1]
    finally:
        server.shutdown()


def test_unbatchable_requests_are_served_alone_in_order(identity_model):
    """n > 1 and echo completions wait for the batch to drain and are served alone; all answered."""
    server = serving(identity_model, decode_concurrency=4)
    try:
        def fn(c, i: int):
            if i % 2:
                r = c.completions.create(model=MODEL_ID, prompt=PROMPTS[i], max_tokens=5, temperature=0, n=2)
                return [ch.text for ch in r.choices]
            return ask(c, i, "kvp", "text")[1]

        got = concurrently(server, 6, fn)
        for i in range(1, 6, 2):
            assert len(got[i]) == 2 and got[i][0] == got[i][1]
        assert server.worker.stats.failed == 0
    finally:
        server.shutdown()


def test_disconnected_client_leaves_the_batch(identity_model):
    """A streaming client that goes away is removed from the batch; the others finish."""
    server = serving(identity_model, decode_concurrency=4)
    try:
        def fn(c, i: int):
            if i == 0:
                stream = c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "go"}],
                                                   max_tokens=2000, stream=True)
                for _ in zip(range(3), stream):
                    pass
                stream.close()
                return None
            return ask(c, i, "kvp", "chat")[1]

        concurrently(server, 3, fn)
        def gone() -> list:
            return [j for j in list(server.worker.stats.jobs) if j.request.max_tokens == 2000]

        deadline = time.time() + 60
        while not gone() and time.time() < deadline:
            time.sleep(0.05)
        assert server.worker.stats.cancelled == 1
        (job,) = gone()
        assert job.generated < 2000
        assert server.worker.idle.wait(60)
    finally:
        server.shutdown()


def test_models_whose_caches_cannot_merge_are_served_one_at_a_time(identity_dirs, tokenizer_dir, tmp_path):
    """Only plain KVCache layers batch: a sliding-window model (gemma3) and a hybrid (qwen3_next)
    are served by the one-at-a-time loop even with --decode-concurrency, and answered."""
    from kvp_mlx import testing as mb
    from kvp_mlx.server.batching import batching_possible

    from conftest import VOCAB

    assert batching_possible(load(identity_dirs["llama"]))
    assert not batching_possible(load(identity_dirs["gemma3"]))
    cfg = mb.plain_only_config("qwen3_next", 2, VOCAB)
    hybrid = load(mb.save_lm_dir(tmp_path / "qwen3_next", mb.build_model(cfg, seed=0), cfg, tokenizer_dir))
    assert not batching_possible(hybrid)
    server = serving(hybrid, method="base", decode_concurrency=4)
    try:
        got = concurrently(server, 3, lambda c, i: c.completions.create(
            model=MODEL_ID, prompt=PROMPTS[i + 1], max_tokens=5, temperature=0).choices[0].text)
        assert len(got) == 3 and server.worker.stats.failed == 0 and server.worker.stats.served == 3
        assert server.worker.stats.widest_batch == 0
    finally:
        server.shutdown()
