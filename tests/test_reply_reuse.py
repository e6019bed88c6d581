"""Reuse through previous replies (issue 26): a conversation resent through the `openai` client, its
replies re-tokenized from their text, reuses the server's cached tokens of those replies, and each
answer equals a session continuing its own tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from kvp_mlx.conversation.session import Session  # noqa: E402
from kvp_mlx.model import load  # noqa: E402
from kvp_mlx.server import KVPServer, ServerConfig  # noqa: E402
from kvp_mlx.server.prompt_cache import SessionCache, common_prefix  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TURNS = ["Write a function that adds two numbers.", "Now make it multiply.", "Add a docstring, please.",
         "And a test for it."]


@pytest.fixture(scope="module")
def chat_dir(identity_dirs, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("reply-reuse") / "llama"
    shutil.copytree(identity_dirs["llama"], dst)
    for part in ("base", "aux"):
        path = dst / part / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": CHAT_TEMPLATE}))
    return dst


def test_a_resent_conversation_reuses_its_replies(chat_dir):
    model = load(chat_dir)
    tok = model.tokenizer
    server = KVPServer(model, ServerConfig(model_id="m", method="kvp"), "127.0.0.1", 0).start()
    ref = Session(model, method="kvp")  # the same conversation continuing its own tokens
    messages: list[dict] = []
    retokenized_differs = False
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0, timeout=120)
        for turn, message in enumerate(TURNS):
            if messages:  # the new message: the template's text after the previous reply
                text = tok.apply_chat_template(messages + [{"role": "user", "content": message}], tokenize=False,
                                               add_generation_prompt=True)
                reply = messages[-1]["content"]
                new = tok.encode(text[text.rindex(reply) + len(reply):], add_special_tokens=False)
                full = tok.encode(text, add_special_tokens=False)
                retokenized_differs |= common_prefix(full, ref.tokens) < len(ref.tokens)
            else:
                new = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
            want = [r.token for r in ref.stream_generate(list(new), max_tokens=12)]
            messages.append({"role": "user", "content": message})
            got = c.chat.completions.create(model="m", messages=messages, max_tokens=12, logprobs=True)
            tokens = [e["id"] for e in got.choices[0].logprobs.model_dump()["content"]]
            assert tokens == want, f"turn {turn}"
            usage = got.usage
            assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - len(new), f"turn {turn}"
            messages.append({"role": "assistant", "content": got.choices[0].message.content})
            assert server.worker.idle.wait(120)  # an idle repair in between (exact on the identity fixture)
    finally:
        server.shutdown()
    assert retokenized_differs  # the replies' text re-tokenizes into other ids: plain prefixes stop short


def test_align_leaves_other_text_alone(chat_dir):
    """A reply resent with other text (edited) is not spliced; nor is a reply whose tokens do not
    stream to the text sent (a stop string or reasoning taken out). (Text appended to a reply is
    spliced as the reply's ids and the rest re-tokenized: the same text.)"""
    model = load(chat_dir)
    tok = model.tokenizer
    cache = SessionCache()
    session = Session(model, method="base")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    text = session.generate(list(prompt), max_tokens=8)
    cache.insert(session, (len(prompt), text))
    assert len(cache._entries[0].replies) == 1
    resend = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": text},
                                      {"role": "user", "content": "more"}], add_generation_prompt=True)
    aligned = cache.align("base", resend)
    assert aligned[: len(session.tokens)] == session.tokens
    edited = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "!" + text},
                                      {"role": "user", "content": "more"}], add_generation_prompt=True)
    assert cache.align("base", edited) == edited
    assert cache.align("kvp", resend) == resend  # another method's sessions are not used
    other = SessionCache()
    other.insert(session, (len(prompt), "not what was generated"))
    assert other._entries[0].replies == []
