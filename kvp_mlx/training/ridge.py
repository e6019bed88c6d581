"""Closed-form predictor initialisation: ridge regression of the base's raw K/V on the auxiliary's.

For base layer i fed by auxiliary layer j, the key map solves
    min_W,b ||X_j W + b - Y_i||^2 + lam ||W||^2
over calibration tokens, with X_j the auxiliary's raw keys (merged heads) and Y_i the base's raw
keys; the same for values. Normal equations are accumulated batch by batch, so calibration data
of any size fits in memory.
"""

from __future__ import annotations

from typing import Iterable

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from kvp_mlx.adapters import forward_raw_kv
from kvp_mlx.predictor import KVPredictor


def _rows(x: mx.array) -> mx.array:
    """[B, H, L, D] -> [B*L, H*D + 1] with a trailing column of ones (the bias)."""
    B, H, L, D = x.shape
    flat = x.transpose(0, 2, 1, 3).reshape(B * L, H * D).astype(mx.float32)
    return mx.concatenate([flat, mx.ones((B * L, 1), dtype=mx.float32)], axis=1)


def _merged(y: mx.array) -> mx.array:
    B, H, L, D = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B * L, H * D).astype(mx.float32)


def ridge_init(
    predictor: KVPredictor,
    base: nn.Module,
    aux: nn.Module,
    batches: Iterable[mx.array],
    lam: float = 1e-2,
    progress: bool = True,
) -> dict:
    """Set every key and value map of ``predictor`` by ridge regression; returns fit statistics.

    ``lam`` is relative: the penalty is ``lam * mean(diag(X^T X))`` so it does not depend on scale.
    """
    mapping = predictor.mapping
    n_aux = len(aux.layers)
    xtx: dict[str, list] = {kind: [None] * n_aux for kind in ("k", "v")}  # per kind: X^T X per aux layer
    xty: dict[str, list] = {kind: [None] * len(mapping) for kind in ("k", "v")}
    tokens = 0
    for batch in tqdm(list(batches), desc="ridge calibration", disable=not progress, leave=False):
        inputs = batch[:, :-1] if batch.shape[1] > 1 else batch
        _, ak, av = forward_raw_kv(aux, inputs)
        _, bk, bv = forward_raw_kv(base, inputs)
        for kind, a_list, b_list in (("k", ak, bk), ("v", av, bv)):
            xs = [_rows(a) for a in a_list]
            for j, x in enumerate(xs):
                g = x.T @ x
                xtx[kind][j] = g if xtx[kind][j] is None else xtx[kind][j] + g
            for i, j in enumerate(mapping):
                c = xs[j].T @ _merged(b_list[i])
                xty[kind][i] = c if xty[kind][i] is None else xty[kind][i] + c
        mx.eval(xtx, xty)
        tokens += inputs.size
    for kind, linears in (("k", predictor.key_transforms), ("v", predictor.value_transforms)):
        for i, j in enumerate(mapping):
            g = xtx[kind][j]
            d = g.shape[0]
            penalty = lam * mx.mean(mx.diagonal(g)[:-1])
            reg = mx.concatenate([mx.full((d - 1,), penalty), mx.zeros((1,))])  # no penalty on the bias
            solution = mx.linalg.solve(g + mx.diag(reg), xty[kind][i], stream=mx.cpu)
            linears[i].weight = solution[:-1].T.astype(linears[i].weight.dtype)
            linears[i].bias = solution[-1].astype(linears[i].bias.dtype)
    mx.eval(predictor.parameters())
    return {"calibration_tokens": tokens, "lambda": lam}
