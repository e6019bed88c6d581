"""One KV Prediction training run: frozen base, auxiliary (separate or layer-pruned), predictor
(ridge or random init), training with corenet's loss, and a KV Prediction directory at the end."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from kvp_mlx import building as mb
from kvp_mlx.errors import KVPError
from kvp_mlx.model import check_same_tokenizer, load_lm, resolve_model_path
from kvp_mlx.predictor import default_layer_mapping
from kvp_mlx.training.data import Batches, pack, read_documents, split_documents, tokenize_documents
from kvp_mlx.training.loop import TrainConfig, train
from kvp_mlx.training.losses import KVPTrainable, LossWeights, kvp_eval_ce, kvp_loss
from kvp_mlx.training.ridge import ridge_init


@dataclass
class KVPRunConfig:
    base: str
    data: list[str]
    out: str
    aux: str | None = None
    aux_layers: list[int] | None = None
    mapping: list[int] | None = None
    aux_train: str = "full"  # full | lora | none
    lora_rank: int = 8
    init: str = "ridge"  # ridge | random
    ridge_lambda: float = 1e-2
    calibration_batches: int = 16
    batch_size: int = 8
    seq_len: int = 256
    heldout_fraction: float = 0.05
    text_field: str = "text"
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainConfig = field(default_factory=TrainConfig)


def _fuse_lora(model: nn.Module) -> None:
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))


def _prepare_aux(cfg: KVPRunConfig, base: nn.Module, base_config: dict, base_tok) -> tuple[nn.Module, dict, str]:
    if (cfg.aux is None) == (cfg.aux_layers is None):
        raise KVPError("give exactly one of --aux (a separate model) or --aux-layers (layer-pruned base)")
    if cfg.aux is not None:
        aux, aux_tok, aux_config = load_lm(resolve_model_path(cfg.aux), "auxiliary")
        check_same_tokenizer(base_tok, aux_tok)
        return aux, aux_config, f"KVP-C with auxiliary {cfg.aux}"
    assert cfg.aux_layers is not None  # exactly one of the two, checked above
    try:
        aux, aux_config = mb.layer_pruned(base, base_config, cfg.aux_layers)
    except ValueError as e:
        raise KVPError(str(e)) from None
    return aux, aux_config, f"KVP-LP keeping base layers {cfg.aux_layers}"


def load_data(cfg: KVPRunConfig, tokenizer) -> tuple[Batches, Batches | None]:
    docs = read_documents(cfg.data, cfg.text_field)
    train_docs, held_docs = split_documents(docs, cfg.heldout_fraction, cfg.train.seed)
    train_seqs = pack(tokenize_documents(tokenizer, train_docs), cfg.seq_len)
    held = None
    if held_docs:
        try:
            held = Batches(pack(tokenize_documents(tokenizer, held_docs), cfg.seq_len), cfg.batch_size, cfg.train.seed)
        except KVPError:
            held = None  # too little held-out text for one sequence
    return Batches(train_seqs, cfg.batch_size, cfg.train.seed), held


def run_kvp_training(cfg: KVPRunConfig, force: bool = False, resume: bool = False,
                     stop_after: int | None = None) -> dict:
    """Train and write the KV Prediction directory ``cfg.out`` (atomically). Returns a summary."""
    out = Path(cfg.out)
    work = out.with_name(out.name + ".train")  # checkpoints live here, beside the output
    if out.exists() and not force:
        raise KVPError(f"output {out} exists (use --force to replace it)")
    base_path = resolve_model_path(cfg.base)
    base, tokenizer, base_config = load_lm(base_path, "base")
    base.set_dtype(mx.float32)
    base.freeze()
    aux, aux_config, source = _prepare_aux(cfg, base, base_config, tokenizer)
    aux.set_dtype(mx.float32)
    n_base, n_aux = len(base.layers), len(aux.layers)
    mapping = cfg.mapping or default_layer_mapping(n_base, n_aux)
    mx.random.seed(cfg.train.seed)
    predictor = mb.make_predictor(base, aux, mapping=mapping, init="random")
    data, held = load_data(cfg, tokenizer)

    summary: dict = {"source": source, "mapping": mapping, "train_sequences": len(data),
                     "heldout_sequences": len(held) if held else 0}
    if cfg.init == "ridge" and not resume:
        calib = list(data.in_order(cfg.calibration_batches))
        summary["ridge"] = ridge_init(predictor, base, aux, calib, lam=cfg.ridge_lambda)
    elif cfg.init not in ("ridge", "random"):
        raise KVPError(f"unknown --init '{cfg.init}' (ridge or random)")

    if cfg.aux_train == "none":
        aux.freeze()
    elif cfg.aux_train == "lora":
        from mlx_lm.tuner.utils import linear_to_lora_layers

        aux.freeze()
        linear_to_lora_layers(aux, len(aux.layers), {"rank": cfg.lora_rank, "scale": 20.0, "dropout": 0.0})
    elif cfg.aux_train != "full":
        raise KVPError(f"unknown --aux-train '{cfg.aux_train}' (full, lora or none)")
    trainable = KVPTrainable(aux, predictor)

    def eval_ce() -> float:
        if held is None:
            return float("nan")
        values = [float(kvp_eval_ce(base, trainable, b)) for b in held.in_order(cfg.train.eval_batches)]
        return sum(values) / len(values)

    summary["eval_ce_before"] = eval_ce()
    history = train(
        trainable, lambda batch: kvp_loss(base, trainable, batch, cfg.loss), data, cfg.train,
        eval_fn=eval_ce if held is not None else None, checkpoint_dir=work, resume=resume,
        desc="kvp train", stop_after=stop_after,
    )
    summary["history"] = history
    summary["eval_ce_after"] = eval_ce()
    if stop_after is not None and stop_after < cfg.train.steps:
        return summary  # interrupted on purpose: checkpoint written, no output
    if cfg.aux_train == "lora":
        _fuse_lora(aux)
    write_kvp_dir_atomically(out, base, base_config, aux, aux_config, predictor, base_path, source, force,
                             training={"config": _jsonable(cfg),
                                       "summary": {k: v for k, v in summary.items() if k != "history"}})
    (out / "train_history.json").write_text(json.dumps(history))
    shutil.rmtree(work, ignore_errors=True)
    return summary


def write_kvp_dir_atomically(out: Path, base, base_config, aux, aux_config, predictor, tokenizer_dir: Path,
                             source: str, force: bool, training: dict | None = None) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        mb.save_kvp_dir(tmp, base, base_config, aux, aux_config, predictor, tokenizer_dir, source)
        if training is not None:
            (tmp / "training.json").write_text(json.dumps(training, indent=2, default=str))
        if out.exists():
            if not force:
                raise KVPError(f"output {out} exists (use --force to replace it)")
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(cfg: KVPRunConfig) -> dict:
    d = asdict(cfg)
    return json.loads(json.dumps(d, default=str))


def parse_int_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise KVPError(f"expected comma-separated integers, got '{text}'") from None
