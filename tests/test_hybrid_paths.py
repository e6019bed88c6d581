"""Hybrid and recurrent models (qwen3_next, falcon_h1, mamba) on the paths beyond generate and chat:
`kvp-mlx serve` with ``"method": "base"`` answers mlx-lm's tokens (its prompt cache reuses a hybrid
session only when a request extends it: recurrent states cannot be trimmed), `kvp-mlx evaluate
--method base` scores as mlx-lm's own lm-eval model, and `kvp-mlx bench` runs base and mlx-lm on
a model without a FLOPs entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx_lm
import pytest
from mlx_lm.models.cache import make_prompt_cache

from kvp_mlx import testing as mb
from kvp_mlx.model import load

from conftest import VOCAB

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def hybrid_dir(tokenizer_dir, tmp_path_factory) -> Path:
    tok = shutil.copytree(tokenizer_dir, tmp_path_factory.mktemp("hybrid-tok") / "tok")
    path = tok / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": CHAT_TEMPLATE}))
    cfg = mb.plain_only_config("qwen3_next", 2, VOCAB)
    return mb.save_lm_dir(tmp_path_factory.mktemp("hybrid") / "qwen3_next", mb.build_model(cfg, seed=0), cfg, tok)


def test_server_answers_a_hybrid_as_mlx_lm(hybrid_dir):
    """Three requests with ``"method": "base"``: a first turn, the conversation extended (the held
    session is handed over: recurrent states need no trim to extend), and another conversation
    sharing only a prefix of the first (the hybrid session cannot be cut back to it: a fresh
    one). Every answer is mlx-lm's greedy generation from scratch."""
    openai = pytest.importorskip("openai")
    from kvp_mlx.server import KVPServer, ServerConfig

    model = load(hybrid_dir)
    ref_model, tokenizer = mlx_lm.load(str(hybrid_dir))
    server = KVPServer(model, ServerConfig(model_id="m", method="base"), "127.0.0.1", 0).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        first = [{"role": "user", "content": "Write a function that adds two numbers."}]
        reply, held = "", []  # the first answer's text, and the tokens its session holds
        conversations = [first, None, [{"role": "user", "content": "Write a function that adds three numbers."}]]
        for turn, messages in enumerate(conversations):
            if messages is None:  # the first conversation, extended by its reply and a new message
                messages = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And?"}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if turn == 1:  # the server puts its reply's own ids back (its text re-tokenizes otherwise)
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                ids = held + tokenizer.encode(text[text.rindex(reply) + len(reply):], add_special_tokens=False)
            want = [r.token for r in mlx_lm.stream_generate(ref_model, tokenizer, ids, max_tokens=10,
                                                            prompt_cache=make_prompt_cache(ref_model))]
            got = client.chat.completions.create(model="m", messages=messages, max_tokens=10, logprobs=True,
                                                 extra_body={"method": "base"})
            tokens = [e["id"] for e in got.choices[0].logprobs.model_dump()["content"]]
            assert tokens == want, f"request {turn}"
            cached = got.usage.prompt_tokens_details.cached_tokens
            # reused only where the held session's whole history starts the request (no trim)
            extends = turn == 1 and len(held) < len(ids) and ids[: len(held)] == held
            assert cached == (len(held) if extends else 0), (turn, cached)
            if turn == 0:
                reply, held = got.choices[0].message.content, ids + tokens
    finally:
        server.shutdown()


def test_prompt_cache_never_trims_a_hybrid_session(hybrid_dir):
    """The server's prompt cache hands a hybrid session over only to a request that extends it: a
    request equal to its history, or sharing only a prefix, gets nothing (no trim is needed)."""
    from kvp_mlx.conversation.session import Session
    from kvp_mlx.server.prompt_cache import SessionCache

    session = Session(load(hybrid_dir), method="base")
    session.generate([5, 6, 7, 8], max_tokens=3)
    held = list(session.tokens)
    cache = SessionCache()
    cache.insert(session)
    assert cache.fetch("base", held[:-1] + [9]) == (None, 0)
    assert cache.fetch("base", held) == (None, 0)
    assert cache.fetch("base", held + [9]) == (session, len(held))


def test_evaluate_base_on_a_hybrid_is_mlx_lms_own(hybrid_dir, tmp_path):
    """`evaluate --method base` on qwen3_next: the same log-likelihoods as mlx-lm's own lm-eval model
    (mlx_lm.evaluate.MLXLM; chat templates off in both, kvp-mlx's default) on the same local task."""
    pytest.importorskip("lm_eval")
    from lm_eval import evaluator
    from mlx_lm.evaluate import MLXLM

    from kvp_mlx import evaluate as ev

    from test_evaluate import write_tasks

    tasks = write_tasks(tmp_path / "tasks")
    ours = ev.evaluate(str(hybrid_dir), method="base", tasks=["local_ll"], include_paths=[tasks])
    theirs = evaluator.simple_evaluate(model=MLXLM(str(hybrid_dir), use_chat_template=False), tasks=["local_ll"],
                                       task_manager=ev.task_manager([tasks], include_defaults=False),
                                       log_samples=True)

    def lls(results: dict) -> list[float]:
        return [r[0][0] for s in sorted(results["samples"]["local_ll"], key=lambda s: s["doc_id"])
                for r in s["resps"]]

    assert len(lls(ours)) == 9 and len(set(lls(ours))) > 1
    assert lls(ours) == pytest.approx(lls(theirs), abs=1e-4)
    assert ev.scores(ours)["local_ll"] == ev.scores(theirs)["local_ll"]


def test_bench_times_a_hybrid_and_flops_refuse_it_in_one_line(hybrid_dir, capsys):
    """`kvp-mlx bench --methods base,mlx-lm` needs no FLOPs model and runs; the FLOPs count (the
    lab's `bench.ttft`, method costs) refuses a model without a registry entry in one line."""
    from kvp_mlx.cli import main
    from kvp_mlx.errors import KVPError
    from kvp_mlx.flops import model_shape

    assert main(["bench", "--model", str(hybrid_dir), "--methods", "base,mlx-lm", "-p", "24", "-g", "4",
                 "-n", "1", "--warmup", "1"]) == 0
    table = capsys.readouterr().out
    assert "| base |" in table and "| mlx-lm |" in table
    with pytest.raises(KVPError, match="no FLOPs model for architecture 'qwen3_next'.*ArraysCache") as info:
        model_shape(load(hybrid_dir).base)
    assert "\n" not in str(info.value)
