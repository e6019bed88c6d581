"""Losses of KV Prediction training, as corenet computes them."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.adapters import arch_of, attention_modules, forward_raw_kv, forward_with_predicted_kv
from kvp_mlx.predictor import KVPredictor


@dataclass
class LossWeights:
    aux_ce: float = 1.0  # lambda_A
    consistency: float = 1.0  # lambda_C
    average_layers: bool = False  # consistency averaged (paper's preference) or summed (released configs)
    z_loss: float = 1e-4
    # Fraction of training sequences whose first s positions (s uniform in [0, T)) hold the base's
    # exact K/V instead of predicted ones: a warm session after a repair (exact history, predicted
    # new message) is then in the training distribution. 0 = corenet.
    exact_prefix_fraction: float = 0.0


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


def z_loss(logits: mx.array) -> mx.array:
    return mx.mean(mx.logsumexp(logits, axis=-1) ** 2)


def lm_loss(model: nn.Module, batch: mx.array, z_weight: float = 1e-4) -> tuple[mx.array, dict]:
    """Next-token CE (+ z-loss) of a plain language model over ``batch`` [B, T + 1]."""
    return _next_token_loss(model, batch, z_weight)


def targeted_lm_loss(model: nn.Module, batch: mx.array, target_weight: float,
                     z_weight: float = 1e-4) -> tuple[mx.array, dict]:
    """``lm_loss`` plus ``target_weight`` times the CE over marked tokens: ``batch`` [B, 2, T + 1] holds
    token ids in row 0 and a 0/1 mark per token in row 1 (e.g. the answers of a question-answering
    corpus, so that the signal a small model must learn from is not drowned in easy text)."""
    return _next_token_loss(model, batch[:, 0], z_weight, batch[:, 1, 1:].astype(mx.float32), target_weight)


def _next_token_loss(model: nn.Module, ids: mx.array, z_weight: float, marks: mx.array | None = None,
                     target_weight: float = 0.0) -> tuple[mx.array, dict]:
    logits = model(ids[:, :-1])
    per_token = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="none")
    ce = per_token.mean()
    loss, metrics = ce, {"ce": ce}
    if marks is not None:
        metrics["target_ce"] = (per_token * marks).sum() / mx.maximum(marks.sum(), 1.0)
        loss = loss + target_weight * metrics["target_ce"]
    if z_weight:
        loss = loss + z_weight * z_loss(logits)
    return loss, metrics


class KVPTrainable(nn.Module):
    """What a KV Prediction run trains: the auxiliary model (possibly frozen) and the predictor."""

    def __init__(self, aux: nn.Module, predictor: KVPredictor):
        super().__init__()
        self.aux = aux
        self.predictor = predictor


def exact_prefix_lengths(batch: int, length: int, fraction: float) -> mx.array:
    """Per sequence, how many leading positions hold exact base K/V: 0 for a ``1 - fraction`` share
    of the sequences, uniform in [0, length) for the others."""
    mixed = mx.random.uniform(shape=(batch,)) < fraction
    split = mx.random.randint(0, length, shape=(batch,))
    return mx.where(mixed, split, 0)


def mix_exact_prefix(
    predicted: list[tuple[mx.array, mx.array]], exact_keys: list[mx.array], exact_values: list[mx.array],
    prefix: mx.array,
) -> list[tuple[mx.array, mx.array]]:
    """Raw K/V [B, heads, T, D] per layer: the exact entries before ``prefix[b]``, predicted ones after."""
    length = predicted[0][0].shape[2]
    exact = (mx.arange(length)[None, :] < prefix[:, None])[:, None, :, None]  # [B, 1, T, 1]
    return [(mx.where(exact, ek, k), mx.where(exact, ev, v))
            for (k, v), ek, ev in zip(predicted, exact_keys, exact_values)]


def kvp_loss(
    base: nn.Module, trainable: KVPTrainable, batch: mx.array, weights: LossWeights
) -> tuple[mx.array, dict]:
    """CE(base attending only to predicted K/V) + lambda_A CE(aux) + lambda_C L1 consistency (+ z-loss).

    With ``weights.exact_prefix_fraction`` > 0, that share of the sequences attends to the base's
    exact K/V before a random split and to predicted K/V after it; the base CE then counts the
    positions from the split on (the earlier ones see exact K/V only)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    aux_logits, aux_keys, aux_values = forward_raw_kv(trainable.aux, inputs)
    predicted = trainable.predictor(aux_keys, aux_values)
    raw_keys: list[mx.array] = []
    raw_values: list[mx.array] = []
    if weights.consistency or weights.exact_prefix_fraction:
        _, raw_keys, raw_values = forward_raw_kv(base, inputs)
        raw_keys = [mx.stop_gradient(k) for k in raw_keys]
        raw_values = [mx.stop_gradient(v) for v in raw_values]
    if weights.exact_prefix_fraction:
        prefix = exact_prefix_lengths(inputs.shape[0], inputs.shape[1], weights.exact_prefix_fraction)
        base_logits = forward_with_predicted_kv(base, inputs, mix_exact_prefix(predicted, raw_keys, raw_values, prefix))
        counted = (mx.arange(inputs.shape[1])[None, :] >= prefix[:, None]).astype(mx.float32)
        per_token = nn.losses.cross_entropy(base_logits, targets, reduction="none")
        ce_base = mx.sum(per_token * counted) / mx.sum(counted)
    else:
        base_logits = forward_with_predicted_kv(base, inputs, predicted)
        ce_base = cross_entropy(base_logits, targets)
    ce_aux = cross_entropy(aux_logits, targets)
    loss = ce_base + weights.aux_ce * ce_aux
    metrics: dict = {"ce": ce_base, "ce_aux": ce_aux}
    if weights.consistency:
        arch, attns = arch_of(base), attention_modules(base)
        target_k = [arch.normed_keys(attn, k) for attn, k in zip(attns, raw_keys)]
        l1 = [
            mx.mean(mx.abs(arch.normed_keys(attn, k) - tk)) + mx.mean(mx.abs(v - tv))
            for attn, (k, v), tk, tv in zip(attns, predicted, target_k, raw_values)
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
