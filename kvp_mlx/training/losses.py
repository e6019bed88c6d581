"""Losses as corenet computes them (kv-prediction.md, "Training")."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.adapters import attention_modules, forward_raw_kv, forward_with_predicted_kv
from kvp_mlx.predictor import KVPredictor


@dataclass
class LossWeights:
    aux_ce: float = 1.0  # lambda_A
    consistency: float = 1.0  # lambda_C
    average_layers: bool = False  # consistency averaged (paper's preference) or summed (released configs)
    z_loss: float = 1e-4


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


def z_loss(logits: mx.array) -> mx.array:
    return mx.mean(mx.logsumexp(logits, axis=-1) ** 2)


def lm_loss(model: nn.Module, batch: mx.array, z_weight: float = 1e-4) -> tuple[mx.array, dict]:
    """Next-token CE (+ z-loss) of a plain language model over ``batch`` [B, T + 1]."""
    logits = model(batch[:, :-1])
    ce = cross_entropy(logits, batch[:, 1:])
    loss = ce + z_weight * z_loss(logits) if z_weight else ce
    return loss, {"ce": ce}


class KVPTrainable(nn.Module):
    """What a KV Prediction run trains: the auxiliary model (possibly frozen) and the predictor."""

    def __init__(self, aux: nn.Module, predictor: KVPredictor):
        super().__init__()
        self.aux = aux
        self.predictor = predictor


def base_targets(base: nn.Module, inputs: mx.array) -> tuple[list[mx.array], list[mx.array]]:
    """The base's own K/V for the consistency loss: keys after its key norm (before RoPE), raw values."""
    _, keys, values = forward_raw_kv(base, inputs)
    keys = [_normed(attn, k) for attn, k in zip(attention_modules(base), keys)]
    return [mx.stop_gradient(k) for k in keys], [mx.stop_gradient(v) for v in values]


def _normed(attn: nn.Module, keys: mx.array) -> mx.array:
    return attn.k_norm(keys) if "k_norm" in attn else keys


def kvp_loss(
    base: nn.Module, trainable: KVPTrainable, batch: mx.array, weights: LossWeights
) -> tuple[mx.array, dict]:
    """CE(base attending only to predicted K/V) + lambda_A CE(aux) + lambda_C L1 consistency (+ z-loss)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    aux_logits, aux_keys, aux_values = forward_raw_kv(trainable.aux, inputs)
    predicted = trainable.predictor(aux_keys, aux_values)
    base_logits = forward_with_predicted_kv(base, inputs, predicted)
    ce_base = cross_entropy(base_logits, targets)
    ce_aux = cross_entropy(aux_logits, targets)
    loss = ce_base + weights.aux_ce * ce_aux
    metrics: dict = {"ce": ce_base, "ce_aux": ce_aux}
    if weights.consistency:
        target_k, target_v = base_targets(base, inputs)
        attns = attention_modules(base)
        l1 = [
            mx.mean(mx.abs(_normed(attn, k) - tk)) + mx.mean(mx.abs(v - tv))
            for attn, (k, v), tk, tv in zip(attns, predicted, target_k, target_v)
        ]
        consistency = sum(l1) / len(l1) if weights.average_layers else sum(l1)
        loss = loss + weights.consistency * consistency
        metrics["l1"] = consistency
    if weights.z_loss:
        loss = loss + weights.z_loss * (z_loss(base_logits) + z_loss(aux_logits))
    return loss, metrics


def kvp_eval_ce(base: nn.Module, trainable: KVPTrainable, batch: mx.array) -> mx.array:
    """Held-out CE of the base attending only to predicted K/V (the quantity KVP trains down)."""
    inputs = batch[:, :-1]
    _, aux_keys, aux_values = forward_raw_kv(trainable.aux, inputs)
    logits = forward_with_predicted_kv(base, inputs, trainable.predictor(aux_keys, aux_values))
    return cross_entropy(logits, batch[:, 1:])
