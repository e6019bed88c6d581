"""Prompt-cache files both ways (issue 26): `mlx_lm.generate --prompt-cache-file` continues a file
`kvp-mlx cache-prompt` wrote, and `kvp-mlx generate --prompt-cache-file` continues one
`mlx_lm.cache_prompt` wrote, each with the tokens the other gives (greedy, mlx-lm's own CLIs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import load_prompt_cache

import kvp_mlx
from kvp_mlx.cli import main
from kvp_mlx.conversation.session_file import (load_session, mlx_lm_continuation_ids, read_metadata,
                                               save_session)
from kvp_mlx.conversation.session import Session
from kvp_mlx.errors import KVPError
from kvp_mlx.model import load

DEMO = Path(kvp_mlx.__file__).parent / "default_model"
BASE = DEMO / "base"  # a plain mlx-lm directory with a tokenizer (no chat template)
CONTEXT, QUESTION = "def fibonacci(n):", "    if n < 2:"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def mlx_lm_cli(tool: str, *args: str) -> str:
    """One of mlx-lm's CLIs, as a user runs it; returns its standard output."""
    env = dict(os.environ, PYTHONPATH=str(Path(kvp_mlx.__file__).parent.parent))
    code = (f"import kvp_mlx, sys, runpy; sys.argv = ['{tool}'] + sys.argv[1:]; "
            f"runpy.run_module('{tool}', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def mlx_lm_generated(*args: str) -> str:
    """The text `mlx_lm.generate` prints between its separators (greedy)."""
    out = mlx_lm_cli("mlx_lm.generate", "--temp", "0", *args)
    return out.split("==========\n", 2)[1].rsplit("\n==========", 1)[0].rstrip("\n")


def kvp_generated(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["generate", "--quiet", *args]) == 0
    return capsys.readouterr().out.rstrip("\n")


def mlx_lm_tokens(path: Path, prompt: str, max_tokens: int) -> list[int]:
    """mlx_lm.generate's continuation of a prompt-cache file, as token ids (its Python functions)."""
    cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    model, tokenizer = mlx_lm.load(metadata["model"], tokenizer_config=json.loads(metadata["tokenizer_config"]))
    ids = mlx_lm_continuation_ids(tokenizer, prompt)
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=max_tokens, prompt_cache=cache)]


def test_mlx_lm_generate_continues_a_kvp_mlx_base_file(tmp_path, capsys):
    path = tmp_path / "ours.safetensors"
    assert main(["cache-prompt", "--model", str(BASE), "--method", "base", "--open-message", "--prompt", CONTEXT,
                 "--prompt-cache-file", str(path)]) == 0
    theirs = mlx_lm_generated("--prompt-cache-file", str(path), "--prompt", QUESTION, "-m", "16")
    ours = kvp_generated(capsys, "--prompt-cache-file", str(path), "--prompt", QUESTION, "-m", "16")
    assert theirs == ours and ours.strip()
    # the same token ids, and those of one uninterrupted base generation of the whole text
    model = load(BASE)
    session = load_session(model, path)
    assert read_metadata(path)["continue"] == "message"
    got = [r.token for r in session.stream_generate(mlx_lm_continuation_ids(model.tokenizer, QUESTION),
                                                     max_tokens=16)]
    assert got == mlx_lm_tokens(path, QUESTION, 16)


def test_kvp_mlx_generate_continues_an_mlx_lm_file(tmp_path, capsys):
    path = tmp_path / "theirs.safetensors"
    mlx_lm_cli("mlx_lm.cache_prompt", "--model", str(BASE), "--prompt", CONTEXT, "--prompt-cache-file", str(path))
    meta = read_metadata(path)
    assert meta["mlx_lm"] and meta["tokens"] is None and meta["method"] == "base"  # no token ids stored
    want = mlx_lm_generated("--prompt-cache-file", str(path), "--prompt", QUESTION, "-m", "16")
    assert kvp_generated(capsys, "--prompt-cache-file", str(path), "--prompt", QUESTION, "-m", "16") == want
    model = load(BASE)
    session = load_session(model, path, mlx_lm_files=True)
    got = [r.token for r in session.stream_generate(mlx_lm_continuation_ids(model.tokenizer, QUESTION),
                                                     max_tokens=16)]
    assert got == mlx_lm_tokens(path, QUESTION, 16)
    # the exact base history: one uninterrupted generation of the same ids gives the same tokens
    ids = model.tokenizer.encode(CONTEXT) + mlx_lm_continuation_ids(model.tokenizer, QUESTION)
    assert got == [r.token for r in mlx_lm.stream_generate(model.base, model.tokenizer, ids, max_tokens=16)]
    # what needs the history's ids is refused in one line
    with pytest.raises(KVPError, match="holds no token ids"):
        load_session(model, path)
    assert main(["generate", "--prompt-cache-file", str(path), "--prompt", "x", "--repetition-penalty", "1.2"]) == 1
    assert main(["generate", "--prompt-cache-file", str(path), "--prompt", "x", "--method", "kvp"]) == 1
    assert "stores no token ids" in capsys.readouterr().err


def test_mlx_lm_reads_only_the_decoders_layers_of_a_kvp_file(tmp_path):
    """A kvp session's file: mlx-lm's list is the base's layers (predicted K/V included); the
    auxiliary's cache rides after them as tensors mlx-lm leaves out; kvp-mlx reads both, checked."""
    model = kvp_mlx.load()
    session = Session(model, method="kvp")
    session.generate("The weather today", max_tokens=4)
    path = save_session(session, tmp_path / "kvp.safetensors")
    cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    assert len(cache) == len(model.base.layers) and Path(metadata["model"]) == Path(model.path) / "base"
    assert json.loads(metadata["tokenizer_config"]) == {}
    for theirs, ours in zip(cache, session.caches.cache):
        assert mx.array_equal(theirs.state[0], ours.state[0]) and theirs.offset == ours.offset
    back = load_session(model, path)
    assert back.tokens == session.tokens and back.predicted == session.predicted
    assert len(back.caches.draft_cache) == len(model.aux.layers)
    # still checksummed: a flipped byte in the auxiliary's tensors is refused
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(KVPError, match="checksum mismatch"):
        load_session(model, bad)
    # mlx-lm continues it (the base over the predicted history) without error
    assert mlx_lm_generated("--prompt-cache-file", str(path), "--prompt", " and", "-m", "4")


def test_chat_template_files_continue_alike_both_ways(identity_dirs, tmp_path, capsys):
    base = tmp_path / "base"
    import shutil

    shutil.copytree(identity_dirs["llama"] / "base", base)
    config = base / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": CHAT_TEMPLATE}))
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    assert main(["cache-prompt", "--model", str(base), "--open-message", "--prompt", "hello there",
                 "--prompt-cache-file", str(ours)]) == 0
    mlx_lm_cli("mlx_lm.cache_prompt", "--model", str(base), "--prompt", "hello there", "--prompt-cache-file",
               str(theirs))
    for path in (ours, theirs):
        want = mlx_lm_generated("--prompt-cache-file", str(path), "--prompt", " and more", "-m", "8")
        assert kvp_generated(capsys, "--prompt-cache-file", str(path), "--prompt", " and more", "-m", "8") == want
