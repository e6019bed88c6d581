"""The training loop: AdamW, grad clipping, warmup + cosine schedule, progress bar, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from kvp_mlx.errors import KVPError
from kvp_mlx.training.data import BatchSource
from kvp_mlx.training.jsonsafe import dumps_json

LossFn = Callable[[mx.array], tuple[mx.array, dict]]


@dataclass
class TrainConfig:
    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200
    seed: int = 0


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    warmup = max(1, min(cfg.warmup_steps, cfg.steps))
    decay_steps = max(1, cfg.steps - warmup)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, warmup),
            optim.cosine_decay(cfg.learning_rate, decay_steps, cfg.learning_rate * cfg.min_lr_ratio),
        ],
        [warmup],
    )
    return optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], eps=1e-8, weight_decay=cfg.weight_decay)


def save_checkpoint(directory: Path, module: nn.Module, optimizer: optim.Optimizer, step: int, history: list) -> None:
    """Written to a temporary folder and renamed: a crash never leaves a half-written checkpoint."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(module.trainable_parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / "state.json").write_text(dumps_json({"step": step, "history": history}))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path, module: nn.Module, optimizer: optim.Optimizer) -> tuple[int, list]:
    try:
        state = json.loads((directory / "state.json").read_text())
        trainable = mx.load(str(directory / "trainable.safetensors"))
        module.load_weights(list(trainable.items()), strict=False)  # type: ignore[union-attr]  # a dict
        opt_state = mx.load(str(directory / "optimizer.safetensors"))
        optimizer.state = tree_unflatten(list(opt_state.items()))  # type: ignore[union-attr]  # a dict
    except (OSError, ValueError, KeyError) as e:
        raise KVPError(f"cannot resume from {directory}: {e}") from None
    return int(state["step"]), list(state["history"])


def train(
    module: nn.Module,
    loss_fn: LossFn,
    data: BatchSource,
    cfg: TrainConfig,
    eval_fn: Callable[[], float | None] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    desc: str = "train",
    stop_after: int | None = None,
) -> list[dict]:
    """Train ``module``'s trainable parameters on ``loss_fn(batch)``; returns the loss history.

    ``stop_after`` ends the run early at that step (as an interruption would), for tests.
    """
    optimizer = make_optimizer(cfg)
    step, history = 0, list[dict]()  # typed empty list
    ckpt = checkpoint_dir / "checkpoint" if checkpoint_dir else None
    if resume:
        if ckpt is None or not (ckpt / "state.json").is_file():
            raise KVPError(f"--resume: no checkpoint in {checkpoint_dir}")
        step, history = load_checkpoint(ckpt, module, optimizer)
    value_and_grad = nn.value_and_grad(module, loss_fn)
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, dynamic_ncols=True, disable=cfg.steps == 0)
    tokens_seen, tic = 0, time.perf_counter()
    while step < cfg.steps and (stop_after is None or step < stop_after):
        batch = data.batch(step)
        (loss, metrics), grads = value_and_grad(batch)
        grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(module, grads)
        mx.eval(module.parameters(), optimizer.state, loss, metrics)
        step += 1
        tokens_seen += batch.shape[0] * (batch.shape[-1] - 1)  # [B, T + 1] or [B, channels, T + 1]
        record = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}
        if eval_fn is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            record["eval_ce"] = eval_fn()
        history.append(record)
        if not math.isfinite(record["loss"]):
            raise KVPError(f"loss became {record['loss']} at step {step}; lower the learning rate")
        rate = tokens_seen / max(time.perf_counter() - tic, 1e-9)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{rate:.0f}")
        bar.update(1)
        if ckpt is not None and (step % cfg.save_every == 0 or step == cfg.steps):
            save_checkpoint(ckpt, module, optimizer, step, history)
    bar.close()
    return history

