"""Tool calling through `kvp-mlx serve` with the `openai` client, as `mlx_lm.server` does it: the
request's tools rendered by the chat template, the model's tool-call text parsed by mlx-lm's own
parser for the tokenizer (``json_tools``: ``<tool_call>{...}</tool_call>``), returned as
``tool_calls`` with ``finish_reason: "tool_calls"``, streamed and not; the tool result sent back and
the answer continuing. Also: ``tool_choice: "none"``, the requested model name in replies, an empty
reply's content, and a logprobs entry for every streamed token.

The model is a scripted tiny llama: every layer's output projections are zero, so the logits depend
only on the last token (a bigram table written into ``lm_head``), the same under ``kvp`` and
``base``. After ``<|assistant|>`` it prefers the answer ``Sunny`` (logit 12) to ``<tool_call>``
(10); a ``logit_bias`` of +5 on ``<tool_call>`` makes it call the tool, and then it writes the
call's JSON (one added token), ``</tool_call>`` and ``</s>``.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from kvp_mlx import testing as mb  # noqa: E402
from kvp_mlx.model import load  # noqa: E402
from kvp_mlx.server import KVPServer, ServerConfig  # noqa: E402

MODEL_ID = "scripted-tools"
VOCAB = 512
HIDDEN = 256
CALL_JSON = '{"name":"get_weather","arguments":{"city":"Paris"}}'  # no spaces: byte-level BPE text
SCRIPTED = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<tool_call>", "</tool_call>", CALL_JSON,
            "Sunny"]
# A Hermes/Qwen-style template: mlx-lm infers its json_tools parser from "<tool_call>" and "tool_call.name".
CHAT_TEMPLATE = (
    "{%- if tools %}<|system|>tools:{% for t in tools %} {{ t.function.name }}{% endfor %}</s>{% endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and m.tool_calls -%}<|assistant|>"
    "{%- for call in m.tool_calls %}{% set tool_call = call.function %}"
    "<tool_call>{\"name\":\"{{ tool_call.name }}\",\"arguments\":{{ tool_call.arguments | tojson }}}</tool_call>"
    "{%- endfor %}</s>"
    "{%- else -%}<|{{ m.role }}|>{{ m.content }}</s>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif -%}"
)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def scripted_tokenizer(directory: Path) -> tuple[Path, dict[str, int]]:
    """The test tokenizer with the scripted strings as added tokens and the chat template above."""
    from tokenizers import AddedToken, Tokenizer

    mb.build_byte_tokenizer(directory, mb.default_tokenizer_texts(), VOCAB - len(SCRIPTED))
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in SCRIPTED])
    tok.save(str(directory / "tokenizer.json"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    ids = {t: tok.token_to_id(t) for t in SCRIPTED + ["</s>"]}
    assert max(ids.values()) < VOCAB
    return directory, ids


def scripted_model(ids: dict[str, int]):
    """A llama whose next token depends only on the last one, following ``TABLE``."""
    table = {"<|assistant|>": {"Sunny": 12.0, "<tool_call>": 10.0}, "<tool_call>": {CALL_JSON: 30.0},
             CALL_JSON: {"</tool_call>": 30.0}, "</tool_call>": {"</s>": 30.0}, "Sunny": {"</s>": 30.0}}
    cfg = mb.tiny_config("llama", n_layers=2, vocab_size=VOCAB)
    cfg.update(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN)
    model = mb.build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    scripted = sorted({ids[t] for t in table})
    for i, t in enumerate(scripted):  # orthogonal, RMS 1: after the final norm, exactly sqrt(D) e_i
        embed[t] = 0
        embed[t, i] = HIDDEN ** 0.5
    head = np.zeros((VOCAB, HIDDEN), np.float32)
    for src, row in table.items():
        for dst, logit in row.items():
            head[ids[dst], scripted.index(ids[src])] = logit / HIDDEN ** 0.5
    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": head, "model.norm.weight": np.ones(HIDDEN)}
    for layer in range(cfg["num_hidden_layers"]):
        for name, param in (("self_attn.o_proj", "weight"), ("mlp.down_proj", "weight")):
            shape = getattr(getattr(model.model.layers[layer], name.split(".")[0]), name.split(".")[1]).weight.shape
            weights[f"model.layers.{layer}.{name}.{param}"] = np.zeros(shape, np.float32)
    model.load_weights([(k, mx.array(v, dtype=mx.float32)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    return model, cfg


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    tokenizer_dir, ids = scripted_tokenizer(root / "tok")
    base, cfg = scripted_model(ids)
    aux, _ = scripted_model(ids)
    predictor = mb.make_predictor(base, aux, mapping=[0, 1], init="identity")
    directory = mb.save_kvp_dir(root / "model", base, cfg, aux, cfg, predictor, tokenizer_dir, "scripted", True)
    shutil.rmtree(tokenizer_dir)
    return load(str(directory)), ids


@contextmanager
def serving(model, method: str = "kvp"):
    server = KVPServer(model, ServerConfig(model_id=MODEL_ID, method=method), "127.0.0.1", 0).start()
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                            timeout=120)
    finally:
        server.shutdown()


def test_the_tokenizer_has_mlx_lms_json_tools_parser(scripted):
    model, ids = scripted
    tok = model.tokenizer
    assert tok.has_tool_calling and (tok.tool_call_start, tok.tool_call_end) == ("<tool_call>", "</tool_call>")
    prompt = tok.apply_chat_template(QUESTION, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|system|>tools: get_weather</s>") and prompt.endswith("<|assistant|>")


def force_call(ids) -> dict:
    return {"logit_bias": {str(ids["<tool_call>"]): 5.0}}


@pytest.mark.parametrize("method", ["kvp", "base"])
def test_tool_round_trip(scripted, method):
    """A tool call parsed from the reply, its result sent back, the answer; non-streamed."""
    model, ids = scripted
    with serving(model, method) as client:
        first = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, tools=[WEATHER_TOOL],
                                               max_tokens=10, extra_body=force_call(ids))
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None  # OpenAI's shape beside tool calls
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert first.model == MODEL_ID
        history = QUESTION + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"},
        ]
        second = client.chat.completions.create(model=MODEL_ID, messages=history, tools=[WEATHER_TOOL],
                                                max_tokens=10)
        assert second.choices[0].finish_reason == "stop"
        assert second.choices[0].message.content == "Sunny"
        assert not second.choices[0].message.tool_calls
        # the second prompt extends the first reply's session: its prefix was reused
        assert second.usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("method", ["kvp", "base"])
def test_tool_round_trip_streamed(scripted, method):
    model, ids = scripted
    with serving(model, method) as client:
        chunks = list(client.chat.completions.create(
            model=MODEL_ID, messages=QUESTION, tools=[WEATHER_TOOL], max_tokens=10, stream=True,
            extra_body=force_call(ids)))
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert len(calls) == 1 and calls[0].index == 0 and calls[0].id
        assert calls[0].function.name == "get_weather"
        assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
        assert {c.model for c in chunks} == {MODEL_ID}
        history = QUESTION + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": calls[0].id, "type": "function",
                 "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 24 C"},
        ]
        chunks = list(client.chat.completions.create(model=MODEL_ID, messages=history, tools=[WEATHER_TOOL],
                                                     max_tokens=10, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Sunny"
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_choice_none_renders_no_tools_and_parses_no_calls(scripted):
    model, ids = scripted
    with serving(model) as client:
        reply = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, tools=[WEATHER_TOOL],
                                               tool_choice="none", max_tokens=10, extra_body=force_call(ids))
        choice = reply.choices[0]
        assert not choice.message.tool_calls and choice.finish_reason == "stop"
        assert choice.message.content == CALL_JSON  # the markers are the state machine's; the text stays
        auto = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, tools=[WEATHER_TOOL],
                                              tool_choice="auto", max_tokens=10, extra_body=force_call(ids))
        # without the tools in the template the prompt is shorter
        assert reply.usage.prompt_tokens < auto.usage.prompt_tokens
        assert auto.choices[0].finish_reason == "tool_calls"
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            client.chat.completions.create(model=MODEL_ID, messages=QUESTION, tools=[WEATHER_TOOL],
                                           tool_choice="sometimes", max_tokens=4)  # type: ignore[arg-type]


def test_bad_tool_messages_are_400s(scripted):
    model, _ = scripted
    bad = [
        [{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}],
        [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}],
        [{"role": "user", "content": "hi", "tool_calls": []}],
        [{"role": "robot", "content": "hi"}],
    ]
    with serving(model) as client:
        for messages in bad:
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="tools"):
            client.chat.completions.create(model=MODEL_ID, messages=QUESTION, tools=[{"type": "function"}],
                                           max_tokens=4)


def test_reply_names_the_requested_model_and_an_empty_reply_is_empty_text(scripted):
    model, ids = scripted
    with serving(model) as client:
        reply = client.chat.completions.create(model="default_model", messages=QUESTION, max_tokens=4,
                                               extra_body={"logit_bias": {str(ids["</s>"]): 100.0}})
        assert reply.model == "default_model"  # the name asked for, as mlx_lm.server
        assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == "stop"
        text = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=2)
        assert text.model == MODEL_ID


def test_every_streamed_token_has_its_logprobs(scripted):
    """Tokens inside a tool call have no text; each still gets its logprobs entry."""
    model, ids = scripted
    with serving(model) as client:
        chunks = list(client.chat.completions.create(
            model=MODEL_ID, messages=QUESTION, tools=[WEATHER_TOOL], max_tokens=10, stream=True, logprobs=True,
            top_logprobs=2, stream_options={"include_usage": True}, extra_body=force_call(ids)))
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        usage = chunks[-1].usage
        assert usage.completion_tokens == 4  # <tool_call>, the call, </tool_call>, </s>
        assert len(entries) == usage.completion_tokens
        assert all(len(e.top_logprobs) == 2 for e in entries)
