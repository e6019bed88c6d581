"""FLOPs of a time-to-first-token computation, counted as MLX executes it.

What is counted (multiply-add = 2 FLOPs; norms, RoPE, softmax and other element-wise work are not):
- projections: ``2 * in * out`` per token for every linear layer;
- attention: ``4 * q_heads * head_dim * queries * keys`` per layer (scores and weighted values).
  MLX's CPU attention is unfused: a chunk of ``c`` queries at offset ``p`` computes all
  ``c * (p + c)`` scores, masked ones included, so the count depends on the prefill chunk size;
- the LM head, only for the tokens whose logits are evaluated (the last prompt token);
- cache-only tokens (every prompt token but the last): MLX evaluates only what the cache needs,
  so the last layer runs just its K/V projection (its attention output and FFN are never computed).

TTFT FLOPs per method, for a prompt of T tokens in chunks of C:
- ``base``: cache-fill of T-1 tokens + one full step attending T keys (the same for plain mlx-lm);
- ``kvp``: auxiliary cache-fill of T-1 tokens + predictor on T-1 positions + one base step;
- ``aux``: the auxiliary model's prefill of T tokens.

Beside FLOPs, ``*_scores`` count attention scores (query-key pairs x heads): each costs an exp in
the softmax, element-wise work that MLX's CPU backend runs far slower than matmul FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from kvp_mlx.adapters import arch_of, attention_modules, kv_shapes
from kvp_mlx.architectures import kv_prediction_problem, model_type_of
from kvp_mlx.errors import KVPError
from kvp_mlx.predictor import KVPredictor


@dataclass(frozen=True)
class LayerShape:
    kv_proj: int  # FLOPs per token of the projections that produce keys/values (fused qkv: all of it)
    other_proj: int  # FLOPs per token of the rest: query/output projections and the FFN
    q_heads: int
    head_dim: int

    def attention(self, queries: int, keys: int) -> int:
        return 4 * self.q_heads * self.head_dim * queries * keys

    def scores(self, queries: int, keys: int) -> int:
        return self.q_heads * queries * keys


@dataclass(frozen=True)
class ModelShape:
    layers: tuple[LayerShape, ...]
    lm_head: int  # FLOPs per token

    def chunk(self, queries: int, offset: int, cache_only: bool) -> int:
        """One forward of ``queries`` tokens after ``offset`` cached ones (batch 1)."""
        keys = offset + queries
        total = 0 if cache_only else self.lm_head * queries
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            total += layer.kv_proj * queries
            if cache_only and i == last:
                continue
            total += layer.other_proj * queries + layer.attention(queries, keys)
        return total

    def chunk_scores(self, queries: int, offset: int, cache_only: bool) -> int:
        """Attention scores (one softmax exp each) computed by the same forward as :meth:`chunk`."""
        layers = self.layers[:-1] if cache_only else self.layers
        return sum(layer.scores(queries, offset + queries) for layer in layers)


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear layer, quantized or not."""
    out_dim, packed = module.weight.shape
    bits = getattr(module, "bits", None)
    return (packed * 32 // bits if bits else packed), out_dim


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear))


def model_shape(model: nn.Module) -> ModelShape:
    """Read per-layer FLOPs from an mlx-lm model's modules (any supported architecture): the
    projections its registry entry names as the K/V ones (a fused qkv projection: all of it).

    A model without a registry entry (hybrid, recurrent, MLA) has no FLOPs model: a one-line
    :class:`KVPError` says so (``kvp-mlx bench`` times such a model without one)."""
    problem = kv_prediction_problem(model)
    if problem:
        raise KVPError(f"no FLOPs model for architecture '{model_type_of(model)}' (FLOPs are counted for the "
                       f"attention architectures of kvp_mlx.architectures; `kvp-mlx bench` times it without "
                       f"FLOPs): {problem.split(': ', 1)[-1]}")
    arch = arch_of(model)
    kv_names = {f"{arch.attention}.{name}" for name in arch.raw_kv.projections()}
    layers = []
    for layer, attn, kv in zip(model.layers, attention_modules(model), kv_shapes(model)):
        kv_proj = other = 0
        for name, module in layer.named_modules():
            if not _is_linear(module):
                continue
            d_in, d_out = _linear_dims(module)
            if name in kv_names:
                kv_proj += 2 * d_in * d_out
            else:
                other += 2 * d_in * d_out
        layers.append(LayerShape(kv_proj, other, arch.q_heads(attn), kv.head_dim))
    head = getattr(model, "lm_head", None)
    if head is not None and _is_linear(head):
        d_in, d_out = _linear_dims(head)
    else:  # tied: the input embedding is the output layer
        emb = next(m for _, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)))
        d_out, d_in = (emb.num_embeddings, emb.dims) if hasattr(emb, "dims") else emb.weight.shape
    return ModelShape(tuple(layers), 2 * d_in * d_out)


def pruned_prefill_flops(shape: ModelShape, tokens_per_layer: list[int], chunk: int, batch: int = 1) -> int:
    """A token-pruning prefill (``lazy``, ``rp``: ``info["tokens_per_layer"]``): layer l computes
    ``tokens_per_layer[l]`` tokens in chunks, causal among themselves; the last layer computes K/V
    for its tokens and everything else for the last token only; logits for the last token."""
    total = shape.lm_head
    last = len(shape.layers) - 1
    for i, (layer, n) in enumerate(zip(shape.layers, tokens_per_layer)):
        if i < last:
            total += (layer.kv_proj + layer.other_proj) * n
            total += sum(layer.attention(min(chunk, n - s), s + min(chunk, n - s)) for s in range(0, n, chunk))
        else:
            total += layer.kv_proj * n + layer.other_proj + layer.attention(1, n)
    return batch * total


def pruned_prefill_scores(shape: ModelShape, tokens_per_layer: list[int], chunk: int, batch: int = 1) -> int:
    """Attention scores of :func:`pruned_prefill_flops`'s prefill."""
    last = len(shape.layers) - 1
    total = 0
    for i, (layer, n) in enumerate(zip(shape.layers, tokens_per_layer)):
        if i < last:
            total += sum(layer.scores(min(chunk, n - s), s + min(chunk, n - s)) for s in range(0, n, chunk))
        else:
            total += layer.scores(1, n)
    return batch * total


def cache_fill_flops(shape: ModelShape, tokens: int, chunk: int, batch: int = 1) -> int:
    """Fill a fresh cache with ``tokens`` positions in chunks (no logits evaluated)."""
    return batch * sum(shape.chunk(min(chunk, tokens - s), s, True) for s in range(0, tokens, chunk))


def step_flops(shape: ModelShape, offset: int, batch: int = 1) -> int:
    """One token after ``offset`` cached positions, through every layer and the LM head."""
    return batch * shape.chunk(1, offset, cache_only=False)


def prefill_flops(shape: ModelShape, tokens: int, chunk: int, batch: int = 1) -> int:
    """Plain prefill (``base``, mlx-lm's generate_step): cache-fill of T-1, then the last token."""
    return cache_fill_flops(shape, tokens - 1, chunk, batch) + step_flops(shape, tokens - 1, batch)


def predictor_flops(predictor: KVPredictor, positions: int, batch: int = 1) -> int:
    """All key and value maps (weight and bias) over ``positions`` tokens."""
    per_token = 0
    for lin in [*predictor.key_transforms, *predictor.value_transforms]:
        d_out, d_in = lin.weight.shape
        per_token += 2 * d_in * d_out + d_out
    return batch * positions * per_token


def cache_fill_scores(shape: ModelShape, tokens: int, chunk: int, batch: int = 1) -> int:
    """Attention scores of a cache-fill (see :func:`prefill_scores`)."""
    return batch * sum(shape.chunk_scores(min(chunk, tokens - s), s, True) for s in range(0, tokens, chunk))


def prefill_scores(shape: ModelShape, tokens: int, chunk: int, batch: int = 1) -> int:
    """Attention scores of a plain prefill. Not FLOPs, but each one costs an exp in MLX's unfused CPU
    softmax (tens of ns each), which at long prompts can outweigh the FLOPs (BENCHMARKS.md)."""
    return cache_fill_scores(shape, tokens - 1, chunk, batch) + batch * shape.chunk_scores(1, tokens - 1, False)


def kvp_flops(
    base: ModelShape, aux: ModelShape, predictor: KVPredictor, tokens: int, chunk: int, batch: int = 1
) -> int:
    """KV Prediction's TTFT: aux cache-fill of T-1 + predictor + one base step attending T keys."""
    if tokens == 1:
        return prefill_flops(base, 1, chunk, batch)
    return (
        cache_fill_flops(aux, tokens - 1, chunk, batch)
        + predictor_flops(predictor, tokens - 1, batch)
        + step_flops(base, tokens - 1, batch)
    )


def kvp_scores(base: ModelShape, aux: ModelShape, tokens: int, chunk: int, batch: int = 1) -> int:
    """Attention scores of KV Prediction's TTFT: the auxiliary cache-fill of T-1 and one base step."""
    if tokens == 1:
        return prefill_scores(base, 1, chunk, batch)
    return cache_fill_scores(aux, tokens - 1, chunk, batch) + batch * base.chunk_scores(1, tokens - 1, False)
