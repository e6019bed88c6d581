"""Generation as mlx-lm does it: token parity with mlx-lm itself (its CLI and its API) for chat
templates, KV-cache options and logits processors, and kvp == base on the identity fixture."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlx_lm
import pytest
from mlx_lm.generate import main as mlx_lm_generate_main
from mlx_lm.sample_utils import make_logits_processors

from kvp_mlx import testing as mb
from kvp_mlx.cli import main as kvp_main
from kvp_mlx.generation import stream_generate
from kvp_mlx.model import load

from conftest import VOCAB, copy_of

# A ChatML-like template (the tests' byte tokenizer has none of its own).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MAX_TOKENS = 24
MESSAGE = "Write a function that adds two numbers."
LONG_MESSAGE = "Explain this code: def f(x):\n    return [y * 2 for y in x if y > 0]\n" * 3


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """Identity KVP directory (aux = copy of base, identity predictor), llama, head_dim 32 (KV
    quantization groups of 32), with a chat template in both tokenizers."""
    cfg = mb.tiny_config("llama", n_layers=2, vocab_size=VOCAB)
    cfg.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    base = mb.build_model(cfg, seed=7)
    aux = copy_of(base, cfg)
    pred = mb.make_predictor(base, aux, mapping=[0, 1], init="identity")
    root = mb.save_kvp_dir(tmp_path_factory.mktemp("chat") / "kvp", base, cfg, aux, cfg, pred, tokenizer_dir,
                           "test chat identity", True)
    for part in ("base", "aux"):
        path = root / part / "tokenizer_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return root


def mlx_lm_cli_text(monkeypatch, capsys, model_dir: Path, prompt: str, *flags: str) -> str:
    """What `mlx_lm.generate --verbose False` prints: mlx-lm itself, in process."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["mlx_lm.generate", "--model", str(model_dir), "--prompt", prompt,
                                      "--max-tokens", str(MAX_TOKENS), "--verbose", "False", *flags])
    mlx_lm_generate_main()
    return capsys.readouterr().out


def kvp_cli_text(capsys, model_dir: Path, prompt: str, method: str, *flags: str) -> str:
    capsys.readouterr()
    code = kvp_main(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-tokens", str(MAX_TOKENS),
                     "--verbose", "False", "--method", method, *flags])
    assert code == 0
    return capsys.readouterr().out


CLI_CASES = {
    "chat template": (MESSAGE, []),
    "system prompt": (MESSAGE, ["--system-prompt", "You write short Python."]),
    "no chat template": ("def add(a, b):", ["--ignore-chat-template"]),
    "kv-bits 8": (MESSAGE, ["--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "0"]),
    # 4 bits: coarse enough that quantizing the cache before or after the last prompt token changes the tokens
    "kv-bits 4": (MESSAGE, ["--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0"]),
    "max-kv-size 64": (LONG_MESSAGE, ["--max-kv-size", "64"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_matches_mlx_lm_generate(chat_dir, monkeypatch, capsys, case):
    prompt, flags = CLI_CASES[case]
    reference = mlx_lm_cli_text(monkeypatch, capsys, chat_dir / "base", prompt, *flags)
    assert reference.strip(), "mlx-lm generated nothing: the case tests nothing"
    assert kvp_cli_text(capsys, chat_dir, prompt, "base", *flags) == reference
    assert kvp_cli_text(capsys, chat_dir, prompt, "kvp", *flags) == reference


def test_long_case_really_exceeds_the_kv_size(chat_dir):
    model = load(chat_dir)
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": LONG_MESSAGE}], add_generation_prompt=True)
    assert len(ids) > 64


API_CASES = {
    "chat template": (dict(), dict()),
    "system prompt": (dict(system_prompt="You write short Python."), dict()),
    "no chat template": (dict(use_chat_template=False), dict()),
    "kv-bits 8": (dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0),
                  dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0)),
    "kv-bits 4": (dict(kv_bits=4, kv_group_size=32, quantized_kv_start=0),
                  dict(kv_bits=4, kv_group_size=32, quantized_kv_start=0)),
    "max-kv-size 64": (dict(max_kv_size=64), dict(max_kv_size=64)),
    # context 64 reaches back into the prompt: the penalties must count the prompt's tokens as mlx-lm does
    "repetition penalty": (dict(repetition_penalty=2.0, repetition_context_size=64),
                           dict(logits_processors=make_logits_processors(repetition_penalty=2.0,
                                                                         repetition_context_size=64))),
    "presence penalty": (dict(presence_penalty=3.0, presence_context_size=64),
                         dict(logits_processors=make_logits_processors(presence_penalty=3.0,
                                                                       presence_context_size=64))),
    "logit bias": (dict(logit_bias={5: 3.0, 17: -2.0}),
                   dict(logits_processors=make_logits_processors(logit_bias={5: 3.0, 17: -2.0}))),
}


def mlx_lm_prompt(tokenizer, case: str) -> list[int]:
    """The ids mlx_lm.generate renders for each case, through the tokenizer's own methods."""
    if case == "no chat template":
        return tokenizer.encode(MESSAGE, add_special_tokens=True)
    messages = [{"role": "user", "content": LONG_MESSAGE if case == "max-kv-size 64" else MESSAGE}]
    if case == "system prompt":
        messages.insert(0, {"role": "system", "content": "You write short Python."})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_tokens_match_mlx_lm_stream_generate(chat_dir, case):
    ours_kwargs, mlx_kwargs = API_CASES[case]
    model, tokenizer = mlx_lm.load(str(chat_dir / "base"))
    ids = mlx_lm_prompt(tokenizer, case)
    reference = [r.token for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=MAX_TOKENS, **mlx_kwargs)]
    assert len(reference) >= 2
    kvp_model = load(chat_dir)
    message = LONG_MESSAGE if case == "max-kv-size 64" else MESSAGE
    for method in ("base", "kvp"):
        ours = [r.token for r in stream_generate(kvp_model, message, method=method, max_tokens=MAX_TOKENS,
                                                 **ours_kwargs)]
        assert ours == reference, f"{case}, method {method}"


def test_penalties_change_the_tokens(chat_dir):
    """The processor cases above would pass vacuously if the processors did nothing here."""
    model = load(chat_dir)
    plain = [r.token for r in stream_generate(model, MESSAGE, max_tokens=MAX_TOKENS)]
    for kwargs in API_CASES["repetition penalty"][0], API_CASES["presence penalty"][0], API_CASES["logit bias"][0]:
        assert [r.token for r in stream_generate(model, MESSAGE, max_tokens=MAX_TOKENS, **kwargs)] != plain


def test_response_carries_mlx_lm_fields(chat_dir):
    model = load(chat_dir)
    pieces = list(stream_generate(model, MESSAGE, max_tokens=5))
    last = pieces[-1]
    assert last.finish_reason in ("stop", "length") and last.method == "kvp"
    assert last.ttft_s > 0 and last.prompt_tps > 0 and last.peak_memory >= 0
    assert last.logprobs.shape == (VOCAB,) and not last.from_draft
    assert last.prompt_tokens == len(mlx_lm_prompt(model.tokenizer, "chat template"))


def test_messages_and_prefill_response(chat_dir):
    model = load(chat_dir)
    messages = [{"role": "user", "content": MESSAGE}]
    by_messages = [r.token for r in stream_generate(model, messages, max_tokens=8)]
    by_text = [r.token for r in stream_generate(model, MESSAGE, max_tokens=8)]
    assert by_messages == by_text
    started = list(stream_generate(model, MESSAGE, max_tokens=4, prefill_response="def add("))
    ids = model.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "def add("}],
                                              tokenize=False, continue_final_message=True)
    assert started[-1].prompt_tokens == len(model.tokenizer.encode(ids, add_special_tokens=False))


def test_base_only_directory_falls_back_to_base(chat_dir, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(chat_dir / "base", plain)
    capsys.readouterr()
    assert kvp_main(["generate", "--model", str(plain), "--prompt", MESSAGE, "--max-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "note:" in captured.err and "using --method base" in captured.err
    assert "(method base)" in captured.out
