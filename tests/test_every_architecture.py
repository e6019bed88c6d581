"""Every registered architecture (kvp_mlx.architectures): the identity pair (auxiliary = a copy of the
base, identity predictor) reproduces the base through prefill, ``generate`` and a 3-turn ``Session``;
plain directories of hybrid, recurrent and MLA models run ``--method base`` as mlx-lm runs them and
are refused for ``kvp`` in one line; a test-local registry entry is enough for a new model_type;
a cross-family pair trains and generates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import make_prompt_cache

from kvp_mlx import architectures
from kvp_mlx import testing as mb
from kvp_mlx.architectures import Architecture, ARCHITECTURES, SeparateKV
from kvp_mlx.cli import main as kvp_main
from kvp_mlx.conversation.session import Session
from kvp_mlx.errors import KVPError
from kvp_mlx.generation import stream_generate
from kvp_mlx.model import load

from conftest import VOCAB, copy_of

ALL = sorted(ARCHITECTURES)  # one test per architecture: a failure names it
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TURNS = ["Write a function that adds two numbers.", "Now make it multiply.", "Add a docstring, please."]
STEPS = 16


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_dir, tmp_path_factory) -> Path:
    out = shutil.copytree(tokenizer_dir, tmp_path_factory.mktemp("chat-tok") / "tok")
    path = out / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": CHAT_TEMPLATE}))
    return out


def identity_pair(root: Path, cfg: dict, tokenizer: Path, seed: int = 0) -> Path:
    base = mb.build_model(cfg, seed=seed)
    n = mb.num_layers(cfg)
    pred = mb.make_predictor(base, copy_of(base, cfg), mapping=list(range(n)), init="identity")
    return mb.save_kvp_dir(root, base, cfg, copy_of(base, cfg), cfg, pred, tokenizer, "test identity", True)


def mlx_lm_turns(model_dir: Path) -> list[list[int]]:
    """mlx-lm's own multi-turn path: one make_prompt_cache carried across the turns."""
    model, tokenizer = mlx_lm.load(str(model_dir))
    cache = make_prompt_cache(model)
    out = []
    for message in TURNS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
        out.append([r.token for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=STEPS,
                                                           prompt_cache=cache)])
    return out


def assert_identity_pair_is_exact(model_dir: Path, name: str) -> None:
    model = load(model_dir)
    tokens = mx.random.randint(0, VOCAB, (2, 21), key=mx.random.key(1))
    base, kvp = model.prefill(tokens, method="base"), model.prefill(tokens, method="kvp")
    diff = mx.abs(base.logits - kvp.logits).max().item()
    assert diff <= 1e-5, f"{name}: first-token logits differ by {diff}"
    own = [type(c) for c in make_prompt_cache(model.base)]
    assert [type(c) for c in kvp.cache] == own, f"{name}: kvp filled other cache classes than the base's own"
    reference, _ = mlx_lm.load(str(model_dir / "base"))
    message = TURNS[0]
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
    want = [r.token for r in mlx_lm.stream_generate(reference, model.tokenizer, ids, max_tokens=STEPS)]
    for method in ("base", "kvp"):
        got = [r.token for r in stream_generate(model, message, method=method, max_tokens=STEPS)]
        assert got == want, f"{name} {method}: generate's tokens differ from mlx-lm's"
    want_turns = mlx_lm_turns(model_dir / "base")
    session = Session(model, method="kvp")
    got_turns = [[r.token for r in session.stream_generate(m, max_tokens=STEPS)] for m in TURNS]
    assert got_turns == want_turns, f"{name}: a 3-turn kvp session differs from mlx-lm's turns"
    assert len(session.predicted) == 3


@pytest.mark.parametrize("arch", ALL)
def test_identity_pair_is_exact(arch, chat_tokenizer, tmp_path):
    cfg = mb.tiny_config(arch, n_layers=2, vocab_size=VOCAB)
    assert_identity_pair_is_exact(identity_pair(tmp_path / arch, cfg, chat_tokenizer), arch)


# --- models kvp-mlx runs as mlx-lm does, and refuses for K/V methods --------------------------


@pytest.fixture(scope="module")
def plain_dirs(tmp_path_factory, chat_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plain-only")
    return {name: mb.save_lm_dir(root / name, mb.build_model(mb.plain_only_config(name, 2, VOCAB), seed=0),
                                 mb.plain_only_config(name, 2, VOCAB), chat_tokenizer)
            for name in mb.PLAIN_ONLY}


@pytest.mark.parametrize("name", mb.PLAIN_ONLY)
def test_plain_model_runs_base_as_mlx_lm_and_refuses_kvp(plain_dirs, name, capsys):
    reference, tokenizer = mlx_lm.load(str(plain_dirs[name]))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": TURNS[0]}], add_generation_prompt=True)
    want = [r.token for r in mlx_lm.stream_generate(reference, tokenizer, ids, max_tokens=STEPS)]
    model = load(plain_dirs[name])
    got = [r.token for r in stream_generate(model, TURNS[0], method="base", max_tokens=STEPS)]
    assert got == want, f"{name}: --method base differs from mlx-lm"
    assert kvp_main(["generate", "--model", str(plain_dirs[name]), "--prompt", TURNS[0], "--method", "base",
                     "--max-tokens", "4", "--verbose", "False"]) == 0
    capsys.readouterr()
    assert kvp_main(["generate", "--model", str(plain_dirs[name]), "--prompt", "hi", "--method", "kvp"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"architecture '{name}'" in err, err
    reason = "multi-head latent attention" if name == "deepseek_v3" else "recurrent or hybrid"
    assert reason in err, err


@pytest.mark.parametrize("name", ["qwen3_next", "falcon_h1", "mamba"])
def test_hybrid_base_session_is_mlx_lm(plain_dirs, name):
    want = mlx_lm_turns(plain_dirs[name])
    session = Session(load(plain_dirs[name]), method="base")
    assert [[r.token for r in session.stream_generate(m, max_tokens=STEPS)] for m in TURNS] == want


def test_recurrent_session_counts_its_tokens_and_refuses_trims(plain_dirs, tmp_path):
    """mamba's states count no positions: the session counts the tokens it fed them (as mlx-lm's
    own multi-turn path carries one cache); trim and a shorter fork are one-line errors that leave
    the session as it was; a whole fork, a save and a load go on exactly."""
    from kvp_mlx.conversation.session_file import load_session, save_session

    model = load(plain_dirs["mamba"])
    want = mlx_lm_turns(plain_dirs["mamba"])
    session = Session(model, method="base")
    assert [r.token for r in session.stream_generate(TURNS[0], max_tokens=STEPS)] == want[0]
    n = len(session.tokens)
    assert session.offset == n
    session.verify()
    for refused in (lambda: session.trim(2), lambda: session.fork(n - 2)):
        with pytest.raises(KVPError, match="recurrent states .* cannot be trimmed") as info:
            refused()
        assert "\n" not in str(info.value)
    assert len(session.tokens) == n
    fork = session.fork()
    save_session(session, tmp_path / "s.safetensors")
    loaded = load_session(model, tmp_path / "s.safetensors")
    for s in (session, fork, loaded):
        assert [r.token for r in s.stream_generate(TURNS[1], max_tokens=STEPS)] == want[1]


# --- the registry: one entry is a new architecture --------------------------------------------


def test_a_test_local_entry_is_a_new_architecture(monkeypatch, chat_tokenizer, tmp_path):
    """A model_type mlx-lm runs with its llama class but kvp-mlx has never heard of: refused for kvp
    (one line, naming it); one registry entry made here, and it is exact."""
    from mlx_lm import utils as mlx_lm_utils

    monkeypatch.setitem(mlx_lm_utils.MODEL_REMAPPING, "tinyllama_alias", "llama")
    cfg = {**mb.tiny_config("llama", 2, VOCAB), "model_type": "tinyllama_alias"}
    monkeypatch.setitem(ARCHITECTURES, "tinyllama_alias", Architecture(
        "tinyllama_alias", lambda n, vocab: cfg, raw_kv=SeparateKV("q_proj", "k_proj", "v_proj")))
    model_dir = identity_pair(tmp_path / "alias", cfg, chat_tokenizer)
    assert_identity_pair_is_exact(model_dir, "tinyllama_alias")
    assert architectures.architecture_of(load(model_dir).base).model_type == "tinyllama_alias"
    monkeypatch.delitem(ARCHITECTURES, "tinyllama_alias")  # without its entry: base runs, kvp is refused
    with pytest.raises(KVPError, match="architecture 'tinyllama_alias': it has no registry entry"):
        load(model_dir)
    base_only = load(model_dir / "base")
    base_only.prefill(mx.array([[1, 2, 3]]), method="base")
    with pytest.raises(KVPError, match="method 'kvp' needs per-layer K/V"):
        base_only.prefill(mx.array([[1, 2, 3]]), method="kvp")


# --- cross-family pairs -----------------------------------------------------------------------


def test_cross_family_pair_trains_and_generates(train_pair, tokenizer_dir, tmp_path, capsys):
    """A qwen3 base with a llama auxiliary (one tokenizer): kvp-mlx train builds the predictor and
    generate runs it; an auxiliary with another tokenizer is refused in one line."""
    root = tmp_path
    base_cfg, aux_cfg = mb.tiny_config("qwen3", 3, VOCAB), mb.tiny_config("llama", 2, VOCAB)
    aux_cfg.update(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    mb.save_lm_dir(root / "base", mb.build_model(base_cfg, 0), base_cfg, tokenizer_dir)
    mb.save_lm_dir(root / "aux", mb.build_model(aux_cfg, 1), aux_cfg, tokenizer_dir)
    code = kvp_main(["train", "--base", str(root / "base"), "--aux", str(root / "aux"), "--data",
                     str(train_pair["data"]), "--out", str(root / "out"), "--steps", "20", "--batch-size", "2",
                     "--seq-len", "32", "--calibration-batches", "2"])
    assert code == 0, capsys.readouterr().err
    model = load(root / "out")
    assert (model.base.model_type, model.aux.model_type) == ("qwen3", "llama")
    capsys.readouterr()
    assert kvp_main(["generate", "--model", str(root / "out"), "--prompt", "def f(x):", "--max-tokens", "4",
                     "--ignore-chat-template", "--verbose", "False"]) == 0
    assert capsys.readouterr().out  # random weights: any text
    other_texts = [text[::-1] for text in mb.default_tokenizer_texts()]  # other merges, the same size
    other_tok = mb.build_byte_tokenizer(root / "other-tok", other_texts, VOCAB)
    mb.save_lm_dir(root / "aux-other", mb.build_model(aux_cfg, 1), aux_cfg, other_tok)
    code = kvp_main(["train", "--base", str(root / "base"), "--aux", str(root / "aux-other"), "--data",
                     str(train_pair["data"]), "--out", str(root / "out2"), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "tokenizers differ" in err, err


def test_cross_family_identity_is_exact(chat_tokenizer, tmp_path):
    """Different families, the same shapes and weights: an internlm3 auxiliary holding a llama base's
    weights, with an identity predictor, is exact."""
    from mlx.utils import tree_flatten

    base_cfg = mb.tiny_config("llama", 2, VOCAB)
    base = mb.build_model(base_cfg, seed=3)
    aux_cfg = {**mb.tiny_config("internlm3", 2, VOCAB), "tie_word_embeddings": False}
    aux = mb.build_model(aux_cfg, seed=4)
    aux.load_weights(tree_flatten(base.parameters()))  # strict: the same parameter names and shapes
    mx.eval(aux.parameters())
    pred = mb.make_predictor(base, aux, mapping=[0, 1], init="identity")
    model_dir = mb.save_kvp_dir(tmp_path / "x", base, base_cfg, aux, aux_cfg, pred, chat_tokenizer, "x", True)
    model = load(model_dir)
    assert (model.base.model_type, model.aux.model_type) == ("llama", "internlm3")
    tokens = mx.random.randint(0, VOCAB, (1, 17), key=mx.random.key(2))
    diff = mx.abs(model.prefill(tokens, method="base").logits - model.prefill(tokens, method="kvp").logits)
    assert diff.max().item() <= 1e-5
    want = [r.token for r in stream_generate(model, TURNS[0], method="base", max_tokens=STEPS)]
    assert [r.token for r in stream_generate(model, TURNS[0], method="kvp", max_tokens=STEPS)] == want


# --- token pruning: exact at keep 1.0 where the entry lets it drive the blocks, else refused ----


@pytest.mark.parametrize("arch", ALL)
def test_token_pruning_keeps_everything_or_refuses(arch, tokenizer_dir, tmp_path):
    cfg = mb.tiny_config(arch, n_layers=2, vocab_size=VOCAB)
    model = load(mb.save_lm_dir(tmp_path / arch, mb.build_model(cfg, seed=2), cfg, tokenizer_dir))
    tokens = mx.random.randint(0, VOCAB, (1, 13), key=mx.random.key(5))
    reason = ARCHITECTURES[arch].not_layerwise
    base = model.prefill(tokens, method="base")
    for method, options in (("lazy", {"schedule": "L1.0-1.0"}), ("rp", {"keep": 1.0})):
        if reason is not None:
            with pytest.raises(KVPError, match=f"token pruning does not support {arch}"):
                model.prefill(tokens, method=method, **options)
            continue
        res = model.prefill(tokens, method=method, prefill_step_size=5, **options)
        diff = mx.abs(base.logits - res.logits).max().item()
        assert diff <= 1e-5, f"{arch} {method}: logits differ by {diff}"


# --- KV-Runahead and EpiCache: exact on every architecture they claim, else refused ------------


@pytest.mark.parametrize("arch", ALL)
def test_epicache_is_full_kv_above_the_history_or_refuses(arch):
    """A budget above the history keeps everything: the next logits equal full KV (every scorer,
    both levels), or the registry's reason refuses the architecture in one line."""
    import numpy as np

    from kvp_mlx.epicache.prefill import LEVELS, PromptScorer, RecencyScorer, WindowScorer, build_memory

    model = mb.build_model(mb.tiny_config(arch, n_layers=2, vocab_size=VOCAB), seed=1)
    rng = np.random.default_rng(0)
    history, question = rng.integers(0, VOCAB, 30).tolist(), rng.integers(0, VOCAB, 5).tolist()
    reason = ARCHITECTURES[arch].not_epicache
    if reason is not None:
        with pytest.raises(KVPError, match=f"epicache does not support {arch}: ") as info:
            build_memory(model, history, 200, RecencyScorer(4), block=16)
        assert "\n" not in str(info.value) and reason in str(info.value)
        return
    full = model(mx.array([history + question]))[0, -1]
    for scorer in (None, PromptScorer((5, 9, 33, 7)), WindowScorer(8), RecencyScorer(4)):
        for level in LEVELS:
            mem = build_memory(model, history, 200, scorer, block=16, level=level)
            diff = float(mx.abs(model(mx.array([question]), cache=mem.cache)[0, -1] - full).max())
            assert diff < 1e-5, (arch, scorer, level, diff)


def test_runahead_equals_base_on_two_ranks_or_refuses(tokenizer_dir, tmp_path):
    """One 2-rank launch over every registered architecture: the last rank's first-token logits
    equal the base prefill's (uneven chunks of 5) where the entry claims runahead; elsewhere the
    method is refused in one line with the entry's reason, before any rank joins."""
    import os
    import sys

    import numpy as np

    from kvp_mlx.runahead.group import launch_local

    here = Path(__file__).parent
    dirs = {a: mb.save_lm_dir(tmp_path / a, mb.build_model(mb.tiny_config(a, 2, VOCAB), seed=0),
                              mb.tiny_config(a, 2, VOCAB), tokenizer_dir) for a in ALL}
    claimed = [a for a in ALL if ARCHITECTURES[a].not_runahead is None]
    tokens = mx.random.randint(0, VOCAB, (1, 23), key=mx.random.key(2))
    for arch in ALL:
        if arch not in claimed:
            with pytest.raises(KVPError, match=f"method 'runahead': runahead does not support {arch}: ") as info:
                load(dirs[arch]).prefill(tokens, method="runahead")
            assert "\n" not in str(info.value) and ARCHITECTURES[arch].not_runahead in str(info.value)
    env = {"PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, str(here / "runahead_rank.py"), str(tmp_path), "even", "5", "2", "60",
            *(str(dirs[a]) for a in claimed)]
    results = launch_local(2, argv, tmp_path, env={**env, "RUNAHEAD_PROMPTS": "1,23,2"}, timeout_s=240)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank}: {r.stderr[-2000:]}"
    last = np.load(tmp_path / "rank1.npz")
    for i, arch in enumerate(claimed):
        base = load(dirs[arch]).prefill(tokens, method="base").logits
        diff = np.abs(last[f"m{i}_b1_t23_logits"] - np.array(base)).max()
        assert diff <= 1e-4, f"{arch}: runahead's logits differ from base by {diff}"
