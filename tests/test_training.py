"""Trainer: loss goes down, resume continues exactly, ridge beats random, data readers."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from kvp_mlx import testing as mb
from kvp_mlx.adapters import forward_raw_kv
from kvp_mlx.errors import KVPError
from kvp_mlx.model import load
from kvp_mlx.training.data import Batches, pack, read_documents, split_documents
from kvp_mlx.training.kvp_run import KVPRunConfig, run_kvp_training
from kvp_mlx.training.loop import TrainConfig

from conftest import VOCAB


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    base_cfg = mb.tiny_config("openelm", 4, VOCAB)
    aux_cfg = mb.tiny_config("openelm", 2, VOCAB)
    aux_cfg.update(model_dim=32, num_query_heads=[2, 2], num_kv_heads=[1, 1])
    mb.save_lm_dir(root / "base", mb.build_model(base_cfg, 0), base_cfg, tokenizer_dir)
    mb.save_lm_dir(root / "aux", mb.build_model(aux_cfg, 1), aux_cfg, tokenizer_dir)
    data = root / "data"
    data.mkdir()
    src = Path(mb.__file__).parent
    for p in sorted(src.glob("*.py")):
        (data / p.name).write_text(p.read_text())
    return {"root": root, "base": root / "base", "aux": root / "aux", "data": data}


def config(pair, out: str, steps: int, **kw) -> KVPRunConfig:
    train_kw = {k: kw.pop(k) for k in list(kw) if k in TrainConfig.__dataclass_fields__}
    return KVPRunConfig(
        base=str(pair["base"]), aux=kw.pop("aux", str(pair["aux"])), data=[str(pair["data"])],
        out=str(pair["root"] / out), seq_len=32, batch_size=4, calibration_batches=4,
        train=TrainConfig(steps=steps, learning_rate=3e-3, warmup_steps=2, eval_every=1000, save_every=5,
                          **train_kw),
        **kw,
    )


def test_twenty_steps_lower_the_loss(pair):
    summary = run_kvp_training(config(pair, "kvp20", 20, init="random"), force=True)
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert summary["eval_ce_after"] < summary["eval_ce_before"]
    model = load(pair["root"] / "kvp20")  # a complete, loadable KV Prediction directory
    assert model.prefill(mx.array([[1, 2, 3, 4]]), method="kvp").logits.shape == (1, VOCAB)


def test_resume_continues_from_the_checkpoint(pair):
    full = run_kvp_training(config(pair, "full", 10, init="random"), force=True)
    cfg = config(pair, "resumed", 10, init="random")
    partial = run_kvp_training(cfg, force=True, stop_after=5)  # "interrupted" after step 5
    assert len(partial["history"]) == 5 and not Path(cfg.out).exists()
    resumed = run_kvp_training(cfg, force=True, resume=True)
    assert [h["step"] for h in resumed["history"]] == list(range(1, 11))
    for a, b in zip(full["history"][5:], resumed["history"][5:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    wa = dict(tree_flatten(load(pair["root"] / "full").predictor.parameters()))
    wb = dict(tree_flatten(load(pair["root"] / "resumed").predictor.parameters()))
    assert max(mx.abs(wa[k] - wb[k]).max().item() for k in wa) <= 1e-4


def kv_prediction_error(directory: Path, tokens: mx.array) -> float:
    """Mean squared error of the predicted raw K/V against the base's own, over every layer."""
    model = load(directory)
    _, ak, av = forward_raw_kv(model.aux, tokens)
    _, bk, bv = forward_raw_kv(model.base, tokens)
    errors = [mx.mean((pk - k) ** 2) + mx.mean((pv - v) ** 2)
              for (pk, pv), k, v in zip(model.predictor(ak, av), bk, bv)]
    return (sum(errors) / len(errors)).item()


def test_ridge_init_beats_random_init(pair):
    ridge = run_kvp_training(config(pair, "ridge0", 0, init="ridge", aux_layers=[0, 2], aux=None), force=True)
    rand = run_kvp_training(config(pair, "rand0", 0, init="random", aux_layers=[0, 2], aux=None), force=True)
    # Ridge minimises the K/V prediction error; on random-weight models that error, not CE, is the
    # meaningful measure (the toy world shows the CE gain on trained models).
    assert ridge["ridge"]["calibration_tokens"] > 0 and "ridge" not in rand
    tokens = mx.random.randint(0, VOCAB, (2, 32), key=mx.random.key(11))
    ridge_err = kv_prediction_error(pair["root"] / "ridge0", tokens)
    rand_err = kv_prediction_error(pair["root"] / "rand0", tokens)
    assert ridge_err < 0.75 * rand_err, (ridge_err, rand_err)


def test_existing_output_is_refused(pair):
    (pair["root"] / "taken").mkdir(exist_ok=True)
    with pytest.raises(KVPError, match="exists"):
        run_kvp_training(config(pair, "taken", 0))


def test_data_readers(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.py").write_text("x = 1")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    docs = read_documents([tmp_path / "a.txt", tmp_path / "d", tmp_path / "c.jsonl"])
    assert [t for _, t in docs] == ["hello world", "x = 1", "one", "two"]
    train, held = split_documents(docs, 0.25, seed=0)
    assert len(held) == 1 and len(train) == 3 and set(train + held) == set(docs)
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(KVPError, match="no string field 'text'"):
        read_documents([tmp_path / "bad.jsonl"])
    with pytest.raises(KVPError, match="not found"):
        read_documents([tmp_path / "missing"])
    import numpy as np

    seqs = pack(np.arange(20, dtype=np.int32), 6)
    assert seqs.shape == (3, 7) and seqs[1, 0] == 6
    batches = Batches(seqs, 2, seed=1)
    assert mx.array_equal(batches.batch(3), batches.batch(3)).item()
