"""One KV Prediction training run: frozen base, auxiliary (separate or layer-pruned), predictor
(ridge or random init), training with corenet's loss, and a KV Prediction directory at the end."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from kvp_mlx import building as mb
from kvp_mlx.errors import KVPError
from kvp_mlx.model import check_same_tokenizer, load_lm, resolve_model_path, write_kvp_config
from kvp_mlx.predictor import default_layer_mapping
from kvp_mlx.training.data import Batches, pack, read_documents, split_documents, tokenize_documents
from kvp_mlx.training.jsonsafe import dumps_json
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
    predictor_only: bool = False  # write the predictor and name --base/--aux instead of copying them
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainConfig = field(default_factory=TrainConfig)


def check_run_config(cfg: KVPRunConfig) -> None:
    """Refuse settings that cannot train, before any model or data is read (CLI option names)."""

    def positive_int(value: int, option: str) -> None:
        if value < 1:
            raise KVPError(f"{option} must be at least 1, got {value}")

    positive_int(cfg.batch_size, "--batch-size")
    positive_int(cfg.seq_len, "--seq-len")
    positive_int(cfg.calibration_batches, "--calibration-batches")
    positive_int(cfg.lora_rank, "--lora-rank")
    positive_int(cfg.train.eval_every, "--eval-every")
    positive_int(cfg.train.save_every, "--save-every")
    positive_int(cfg.train.eval_batches, "eval_batches")
    if cfg.train.steps < 0:
        raise KVPError(f"--steps must be 0 (calibration only) or more, got {cfg.train.steps}")
    if cfg.train.warmup_steps < 0:
        raise KVPError(f"--warmup-steps must be 0 or more, got {cfg.train.warmup_steps}")
    if not (math.isfinite(cfg.train.learning_rate) and cfg.train.learning_rate > 0):
        raise KVPError(f"--learning-rate must be a positive number, got {cfg.train.learning_rate}")
    if not (math.isfinite(cfg.train.grad_clip) and cfg.train.grad_clip > 0):
        raise KVPError(f"--grad-clip must be a positive number, got {cfg.train.grad_clip}")
    if not (math.isfinite(cfg.train.weight_decay) and cfg.train.weight_decay >= 0):
        raise KVPError(f"--weight-decay must be 0 or more, got {cfg.train.weight_decay}")
    if not (math.isfinite(cfg.ridge_lambda) and cfg.ridge_lambda >= 0):
        raise KVPError(f"--ridge-lambda must be 0 or more, got {cfg.ridge_lambda}")
    if not (0 <= cfg.loss.exact_prefix_fraction <= 1):  # also refuses NaN
        raise KVPError(f"--exact-prefix-fraction must be in [0, 1], got {cfg.loss.exact_prefix_fraction}")
    if not (0 <= cfg.heldout_fraction < 1):  # also refuses NaN
        raise KVPError(f"--heldout-fraction must be in [0, 1), got {cfg.heldout_fraction}")
    for name, value in (("--lambda-aux", cfg.loss.aux_ce), ("--lambda-consistency", cfg.loss.consistency),
                        ("--z-loss", cfg.loss.z_loss)):
        if not (math.isfinite(value) and value >= 0):
            raise KVPError(f"{name} must be 0 or more, got {value}")


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


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
            _note(f"the held-out documents hold less than one sequence of {cfg.seq_len} tokens; "
                  "training without held-out evaluation (give more documents or a larger --heldout-fraction)")
    elif cfg.heldout_fraction > 0:
        # documents are never split, so one document leaves nothing to hold out
        _note(f"the training data is a single document ({docs[0][0]}); training without held-out evaluation "
              "(give several files, a directory or a .jsonl file for a held-out loss)")
    return Batches(train_seqs, cfg.batch_size, cfg.train.seed), held


def run_kvp_training(cfg: KVPRunConfig, force: bool = False, resume: bool = False,
                     stop_after: int | None = None) -> dict:
    """Train and write the KV Prediction directory ``cfg.out`` (atomically). Returns a summary."""
    check_run_config(cfg)
    out = Path(cfg.out)
    work = out.with_name(out.name + ".train")  # checkpoints live here, beside the output
    if out.exists() and not force:
        raise KVPError(f"output {out} exists (use --force to replace it)")
    if cfg.predictor_only and cfg.aux_train != "none":
        raise KVPError(
            f"--predictor-only needs --aux-train none: with --aux-train {cfg.aux_train} the auxiliary model "
            "changes in training and must be saved with the predictor "
            "(drop --predictor-only for a self-contained directory)"
        )
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

    def eval_ce() -> float | None:
        if held is None:
            return None  # no held-out set (noted when the data was read)
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
    references = (model_reference(cfg.base), aux_reference(cfg)) if cfg.predictor_only else None
    write_kvp_dir_atomically(out, base, base_config, aux, aux_config, predictor, base_path, source, force,
                             training={"config": _jsonable(cfg),
                                       "summary": {k: v for k, v in summary.items() if k != "history"}},
                             references=references)
    (out / "train_history.json").write_text(dumps_json(history))
    shutil.rmtree(work, ignore_errors=True)
    return summary


def model_reference(given: str) -> str:
    """How a predictor-only directory names a model: a local directory by its absolute path, a
    Hugging Face repo id as given."""
    path = Path(given).expanduser()
    return str(path.resolve()) if path.exists() else given


def aux_reference(cfg: KVPRunConfig) -> str | dict:
    if cfg.aux_layers is not None:
        return {"base_layers": list(cfg.aux_layers)}  # rebuilt from the base at load time (KVP-LP)
    assert cfg.aux is not None
    return model_reference(cfg.aux)


def write_kvp_dir_atomically(out: Path, base, base_config, aux, aux_config, predictor, tokenizer_dir: Path,
                             source: str, force: bool, training: dict | None = None,
                             references: tuple[str, str | dict] | None = None) -> None:
    """Write ``out`` via a temporary sibling. ``references`` = (base, aux) entries for
    kvp_config.json: write a predictor-only directory naming those models instead of copies."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if references is None:
            mb.save_kvp_dir(tmp, base, base_config, aux, aux_config, predictor, tokenizer_dir, source)
        else:
            predictor.save(tmp)
            write_kvp_config(tmp, source, base=references[0], aux=references[1], random_weights=False)
        if training is not None:
            (tmp / "training.json").write_text(dumps_json(training, indent=2, default=str))
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
