"""LazyLLM (`lazy`) and random token pruning (`rp`) on every supported architecture."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from kvp_mlx.adapters import arch_of
from kvp_mlx.errors import KVPError
from kvp_mlx.generation import generate
from kvp_mlx.layerwise import embed, final_logits
from kvp_mlx.methods.lazy_schedule import (
    PRESETS, keep_count, lazy_tokens_per_layer, parse_schedule, rp_tokens_per_layer,
)
from kvp_mlx.model import load

from decoding import decode_greedy
from conftest import ARCHS, NOT_LAYERWISE, VOCAB


def prompt(length: int, seed: int = 0) -> mx.array:
    return mx.random.randint(0, VOCAB, (1, length), key=mx.random.key(seed))


def refused(model, arch: str) -> bool:
    """Architectures token pruning cannot drive: both methods refuse them with a clear error."""
    if arch not in NOT_LAYERWISE:
        return False
    for method, options in (("lazy", {"schedule": "L0.5-0.25"}), ("rp", {"keep": 0.5})):
        with pytest.raises(KVPError, match=f"token pruning does not support {NOT_LAYERWISE[arch]}"):
            model.prefill(prompt(21), method=method, **options)
    return True


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_everything_reproduces_base(identity_dirs, arch):
    model = load(identity_dirs[arch])
    if refused(model, arch):
        return
    tokens = prompt(21, seed=1)
    reference = decode_greedy(model.prefill(tokens, method="base"), 16)
    for method, options in (("lazy", {"schedule": "L1.0-1.0"}), ("rp", {"keep": 1.0})):
        for step in (2048, 8):  # whole prompt and chunked attention
            base = model.prefill(tokens, method="base")
            res = model.prefill(tokens, method=method, prefill_step_size=step, **options)
            diff = mx.abs(base.logits - res.logits).max().item()
            assert diff <= 1e-5, f"{arch} {method} step {step}: logits differ by {diff}"
            assert res.info["tokens_per_layer"] == [21, 21, 21]
            assert mx.array_equal(decode_greedy(res, 16), reference).item()


class _RopeOutputs(nn.Module):
    """Records what an attention's rope returns: queries, then keys, per forward pass."""

    def __init__(self, inner: nn.Module, sink: list):
        super().__init__()
        self.inner = inner
        self._sink = sink

    def __call__(self, x, offset=0):
        y = self.inner(x, offset=offset)
        self._sink.append(y)
        return y


def _head_mean_attention(q_last: np.ndarray, keys: np.ndarray, scale: float) -> np.ndarray:
    """q_last [H, D], keys [Hkv, N, D] -> attention over N averaged over heads (numpy reference)."""
    rep = q_last.shape[0] // keys.shape[0]
    s = np.einsum("hd,hnd->hn", q_last, np.repeat(keys, rep, axis=0)) * scale
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).mean(axis=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_prefill_equals_dense_model_with_pruned_keys_masked(identity_dirs, arch):
    """Pruning the tokens outside A_j from layer j on = the dense mlx-lm blocks with those keys
    masked out from layer j on; and A_{j+1} is the top of the last token's attention over A_j."""
    model = load(identity_dirs[arch])
    if refused(model, arch):
        return
    lm, T = model.base, 24
    tokens = prompt(T, seed=2)
    res = model.prefill(tokens, method="lazy", schedule="L0.5-0.25", prefill_step_size=7)
    active = [c.positions for c in res.cache]
    assert res.info["tokens_per_layer"] == [len(a) for a in active] == lazy_tokens_per_layer("L0.5-0.25", 3, T)
    assert list(active[0]) == list(range(T))
    for outer, inner in zip(active, active[1:]):
        assert set(inner) <= set(outer) and T - 1 in inner

    attn_attr = arch_of(lm).attention_attr
    h = embed(lm, tokens)
    pos = np.arange(T)
    for j, layer in enumerate(lm.layers):
        attn = getattr(layer, attn_attr)
        in_a = np.isin(pos, active[j])
        allowed = (pos[None, :] <= pos[:, None]) & (in_a[None, :] | ~in_a[:, None])
        sink: list = []
        attn.rope = _RopeOutputs(attn.rope, sink)
        try:
            h = layer(h, mx.array(allowed)[None, None], cache=None)
        finally:
            attn.rope = attn.rope.inner
        if j + 1 < len(lm.layers):
            q, k = np.array(sink[0][0, :, -1, :]), np.array(sink[1][0])[:, active[j], :]
            scores = _head_mean_attention(q, k, attn.scale)
            scores[-1] = np.inf  # the last token is always kept
            top = np.sort(active[j][np.argsort(-scores, kind="stable")[: len(active[j + 1])]])
            assert list(top) == list(active[j + 1])
    logits = final_logits(lm, h[:, -1:, :])[:, -1, :]
    assert mx.abs(logits - res.logits).max().item() <= 1e-5


class _RowCounter(nn.Module):
    """Wraps a block's first norm: counts the token rows entering the block."""

    def __init__(self, inner: nn.Module, counts: list):
        super().__init__()
        self.inner = inner
        self._counts = counts

    def __call__(self, x):
        self._counts.append(x.shape[1])
        return self.inner(x)


@pytest.mark.parametrize("arch,layer", [("openelm", 2), ("qwen3", 1), ("llama", 2), ("qwen2", 1)])
def test_aux_cache_revives_pruned_tokens_from_their_stored_state(identity_dirs, arch, layer):
    """Tokens pruned before ``layer`` in prefill and selected again while decoding are computed at
    ``layer`` from the Aux Cache (earlier layers see only the new token), and their K/V there
    equal the base model's (the earlier layers saw every token, so the stored state is exact)."""
    model = load(identity_dirs[arch])
    lm, T = model.base, 16
    tokens = prompt(T, seed=3)
    res = model.prefill(tokens, method="lazy", schedule=f"{layer}:0.5")
    cache = res.cache[layer]
    pruned = sorted(set(range(T)) - set(cache.positions))
    assert len(pruned) == T - keep_count(0.5, T)
    assert sorted(cache.aux_positions) == pruned
    reference = model.prefill(tokens, method="base").cache[layer]

    norm_attr = arch_of(lm).attn_norm_attr
    counts: list[list[int]] = [[] for _ in lm.layers]
    for block, c in zip(lm.layers, counts):
        setattr(block, norm_attr, _RowCounter(getattr(block, norm_attr), c))
    try:
        y = mx.argmax(res.logits, axis=-1)
        revived = []
        for _ in range(8):
            before = set(cache.positions)
            for c in counts:
                c.clear()
            y = mx.argmax(res.decoder(y[:, None], cache=res.cache)[:, -1, :], axis=-1)
            revived = sorted(int(p) for p in set(cache.positions) - before - {cache.length - 1})
            if revived:
                break
    finally:
        for block in lm.layers:
            setattr(block, norm_attr, getattr(block, norm_attr).inner)
    assert revived, "no pruned token was selected again in 8 decoding steps"
    assert set(revived) <= set(pruned)
    assert all(c == [1] for c in counts[:layer]), counts  # no recomputation below the layer
    assert sum(counts[layer]) == 1 + len(revived)
    assert res.decoder.last_tokens_per_layer[layer] == 1 + len(revived)
    rows = cache.rows_of(np.array(revived))
    for mine, ref in zip(cache.rows(rows), (reference.keys, reference.values)):
        assert mx.abs(mine - ref[..., revived, :]).max().item() <= 1e-5
    for c in res.cache:  # every token computed at most once per layer
        assert len(set(c.positions)) == len(c.positions)


def test_decoding_prunes_and_streams(identity_dirs):
    model = load(identity_dirs["qwen2"])
    text = generate(model, "def prefill(model, tokens):", method="lazy", schedule="L0.75-0.25", max_tokens=6)
    assert isinstance(text, str)
    ids = prompt(30, seed=4)
    res = model.prefill(ids, method="lazy", schedule="L0.5-0.1")
    out = decode_greedy(res, 5)
    assert out.shape == (1, 5)
    total = 30 + 4  # the prompt and the four fed-back tokens
    assert res.cache[0].length == total and len(res.cache[0].positions) == total
    assert res.decoder.last_tokens_per_layer[0] == 1
    # the last layer's cache grows by exactly the new token at each step (+ revived tokens)
    assert len(res.cache[2].positions) >= lazy_tokens_per_layer("L0.5-0.1", 3, 30)[2] + 4


def test_rp_keeps_a_random_subset_and_decodes_on_it(identity_dirs):
    model = load(identity_dirs["openelm"])
    ids = prompt(40, seed=5)
    res = model.prefill(ids, method="rp", keep=0.25, prune_seed=1)
    assert res.info["tokens_per_layer"] == rp_tokens_per_layer(0.25, 3, 40) == [10] * 3
    kept = res.cache[0].positions
    assert 39 in kept and all(list(c.positions) == list(kept) for c in res.cache)
    other = model.prefill(ids, method="rp", keep=0.25, prune_seed=2).cache[0].positions
    assert list(other) != list(kept)
    decode_greedy(res, 3)
    assert [len(c.positions) for c in res.cache] == [12] * 3  # kept prompt + 2 fed-back tokens


def test_schedules():
    rates = parse_schedule("L0.75-0.25").keep_rates(28)
    assert rates[:9] == [1.0] * 9 and rates[9] == 0.75 and rates[25] == rates[26] == rates[27] == 0.25
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert lazy_tokens_per_layer("L0.75-0.25", 28, 2048)[:10] == [2048] * 9 + [1536]
    assert lazy_tokens_per_layer("L0.75-0.01", 28, 2048)[-1] == 21
    assert parse_schedule("L0.50-0.5").keep_rates(10) == [1.0] * 3 + [0.5] * 7
    assert parse_schedule("8:0.5,16:0.25").keep_rates(20) == [1.0] * 8 + [0.5] * 8 + [0.25] * 4
    assert lazy_tokens_per_layer("L1.0-1.0", 3, 1) == [1, 1, 1]
    for name in PRESETS:
        r = parse_schedule(name).keep_rates(3)
        assert r[0] == 1.0 and r == sorted(r, reverse=True)
    for bad in ("L0.25-0.5", "0:0.5", "3:0.5,2:0.25", "2:0.25,3:0.5", "fast", "2:1.5"):
        with pytest.raises(KVPError):
            parse_schedule(bad)
    with pytest.raises(KVPError, match="layer 30"):
        parse_schedule("30:0.5").keep_rates(28)


def test_batches_and_bad_options_are_refused(identity_dirs):
    model = load(identity_dirs["llama"])
    two = mx.concatenate([prompt(9), prompt(9, seed=1)])
    for method in ("lazy", "rp"):
        with pytest.raises(KVPError, match="B=1"):
            model.prefill(two, method=method)
    with pytest.raises(KVPError, match="unknown lazy schedule"):
        model.prefill(prompt(9), method="lazy", schedule="quick")
    with pytest.raises(KVPError, match="option .keep. of method .rp.: must lie in"):
        model.prefill(prompt(9), method="rp", keep=0.0)


def test_cli_lazy_and_rp(identity_dirs):
    from test_cli import cli

    model = str(identity_dirs["openelm"])
    proc = cli("generate", "--model", model, "--prompt", "def f(x): return x", "--max-tokens", "4",
               "--method", "lazy", "--lazy-schedule", "L0.75-0.1", "--compare")
    assert proc.returncode == 0, proc.stderr
    assert "method lazy" in proc.stdout and "TTFT base" in proc.stdout and ", lazy " in proc.stdout
    proc = cli("generate", "--model", model, "--prompt", "hello", "--max-tokens", "3", "--method", "rp",
               "--rp-keep", "0.5")
    assert proc.returncode == 0 and "method rp" in proc.stdout, proc.stderr
    proc = cli("generate", "--model", model, "--prompt", "hello", "--method", "lazy", "--lazy-schedule", "L2-1")
    assert proc.returncode == 1 and "error: schedule 'L2-1'" in proc.stderr
    proc = cli("generate", "--model", model, "--prompt", "hello", "--lazy-schedule", "L0.75-0.1")
    assert proc.returncode == 1 and "applies to --method lazy" in proc.stderr


def test_lazy_table_script_runs(tmp_path):
    try:
        from bench import lazy_table
    except ImportError:  # a checkout on PYTHONPATH: bench/ is the top-level package
        from bench import lazy_table
    out = tmp_path / "table.md"
    assert lazy_table.main(["--shape", "tiny", "--prompt-len", "24", "--reps", "1", "--warmup", "0",
                            "--presets", "L0.75-0.25,L1.0-1.0", "--out", str(out)]) == 0
    text = out.read_text()
    for label in ("| base |", "kvp KVP-LP-0.50", "lazy L0.75-0.25", "lazy L1.0-1.0", "rp keep"):
        assert label in text
    assert "| lazy L1.0-1.0 | 100% | 1.00x |" in text


@pytest.mark.parametrize("method,options", [("lazy", {"schedule": "L0.5-0.25"}), ("rp", {"keep": 0.5})])
def test_teacher_forcing_equals_step_by_step_decoding(identity_dirs, method, options):
    """decoder(inputs [1, n]) gives logits for every input token, as n decoding steps would."""
    model = load(identity_dirs["openelm"])
    ids, cont = prompt(20, seed=6), prompt(5, seed=7)
    forced = model.prefill(ids, method=method, **options)
    logits = forced.decoder(cont, cache=forced.cache)
    assert logits.shape == (1, 5, VOCAB)
    stepped = model.prefill(ids, method=method, **options)
    for i in range(5):
        one = stepped.decoder(cont[:, i : i + 1], cache=stepped.cache)[:, -1, :]
        assert mx.abs(one - logits[:, i, :]).max().item() <= 1e-6
