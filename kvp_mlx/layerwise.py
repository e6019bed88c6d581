"""Run an mlx-lm model one block at a time, on any subset of tokens at their own positions.

Token-pruning methods (``lazy``, ``rp``) need per-layer control: which tokens enter a block,
which keys they attend to, and RoPE at each token's original position even when others are
missing. These helpers drive the architecture's own mlx-lm modules (norms, projections,
``q_norm`` / ``k_norm``, ``rope``, MLP, embedding, head); the caller supplies the attention
over whichever keys it chooses. No architecture code is copied.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from kvp_mlx.adapters import Arch, arch_of, model_type_of, sliding_window_layers
from kvp_mlx.architectures import architecture_of_attention
from kvp_mlx.errors import KVPError

# attend(queries, keys, values, scale) -> output [B, H, L, D]; all after norm and RoPE.
Attend = Callable[[mx.array, mx.array, mx.array, float], mx.array]


def check_layerwise_support(model: nn.Module) -> Arch:
    """The model's architecture, refusing what the helpers cannot drive: blocks other than the
    plain pre-norm ones :func:`run_block` assumes, and sliding-window attention layers."""
    arch = arch_of(model)
    if arch.not_layerwise:
        raise KVPError(f"token pruning does not support {model_type_of(model)}: {arch.not_layerwise}")
    if sliding_window_layers(model):
        raise KVPError("token pruning does not support sliding-window attention layers")
    return arch


def _inner(model: nn.Module, arch: Arch) -> nn.Module:
    return getattr(model, arch.inner_attr)


def embed(model: nn.Module, tokens: mx.array) -> mx.array:
    """Token embeddings ``[B, L, dim]`` of ``tokens`` [B, L]."""
    arch = arch_of(model)
    return getattr(_inner(model, arch), arch.embed_attr)(tokens)


def final_logits(model: nn.Module, hidden: mx.array) -> mx.array:
    """Logits of the last block's output ``hidden`` [B, L, dim]: final norm, then the head."""
    arch = arch_of(model)
    inner = _inner(model, arch)
    h = inner.norm(hidden)
    if "lm_head" in model:
        return model.lm_head(h)
    return getattr(inner, arch.embed_attr).as_linear(h)


def rope_at(rope: nn.Module, x: mx.array, positions: np.ndarray) -> mx.array:
    """RoPE of ``x`` [1, H, L, D] with token i at ``positions[i]`` (any increasing positions).

    Contiguous positions take one offset (what mlx-lm does); otherwise each token goes to the
    batch axis with its own offset (RoPE accepts a vector of per-example offsets).
    """
    if len(positions) == 0 or positions[-1] - positions[0] == len(positions) - 1:
        return rope(x, offset=int(positions[0]) if len(positions) else 0)
    if x.shape[0] != 1:
        raise KVPError("per-token RoPE positions need batch size 1")
    per_token = rope(x.transpose(2, 1, 0, 3), offset=mx.array(positions, dtype=mx.int32))
    return per_token.transpose(2, 1, 0, 3)


def project_qkv(attn: nn.Module, x: mx.array, arch: Arch | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """Queries, keys, values ``[B, H, L, D]`` of normed input ``x``: after q/k norm, before RoPE
    (the projections and norms the architecture's entry names)."""
    return (arch or architecture_of_attention(attn)).project_qkv(attn, x)


def block_kv(layer: nn.Module, arch: Arch, x: mx.array, positions: np.ndarray) -> tuple[mx.array, mx.array]:
    """Only the keys (after norm and RoPE) and values a block caches for tokens ``x`` [1, L, dim]."""
    attn = getattr(layer, arch.attention_attr)
    _, k, v = project_qkv(attn, getattr(layer, arch.attn_norm_attr)(x), arch)
    return rope_at(attn.rope, k, positions), v


def run_block(
    layer: nn.Module, arch: Arch, x: mx.array, positions: np.ndarray, attend: Attend
) -> mx.array:
    """One transformer block on tokens ``x`` [1, L, dim] at ``positions``; returns its output."""
    attn = getattr(layer, arch.attention_attr)
    q, k, v = project_qkv(attn, getattr(layer, arch.attn_norm_attr)(x), arch)
    q, k = rope_at(attn.rope, q, positions), rope_at(attn.rope, k, positions)
    out = attend(q, k, v, attn.scale)
    B, _, L, _ = out.shape
    h = x + getattr(attn, arch.out_proj_attr)(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
    return h + getattr(layer, arch.mlp_attr)(getattr(layer, arch.mlp_norm_attr)(h))


def last_query_attention(query: mx.array, keys: mx.array, scale: float) -> mx.array:
    """Attention probabilities of one query over ``keys``, averaged over heads: ``[N]``.

    ``query`` [1, H, 1, D], ``keys`` [1, Hkv, N, D] (grouped-query heads share a key head).
    """
    _, n_heads, _, d = query.shape
    n_kv = keys.shape[1]
    q = query.reshape(1, n_kv, n_heads // n_kv, d) * scale
    scores = q @ keys[0].transpose(0, 2, 1)  # [Hkv, rep, N]
    probs = mx.softmax(scores.astype(mx.float32), axis=-1, precise=True)
    return probs.reshape(n_heads, -1).mean(axis=0)
