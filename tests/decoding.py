"""Greedy decoding of a batch from a prefill result, for the exactness tests (mlx-lm's generation
loop takes one prompt; these tests compare batches of equal-length prompts token by token)."""

from __future__ import annotations

import mlx.core as mx

from kvp_mlx.methods import PrefillResult


def decode_greedy(result: PrefillResult, max_tokens: int) -> mx.array:
    """Greedy tokens ``[B, max_tokens]`` for a batch, the first being argmax of the prefill logits."""
    y = mx.argmax(result.logits, axis=-1)
    out = [y]
    for _ in range(max_tokens - 1):
        logits = result.decoder(y[:, None], cache=result.cache)[:, -1, :]
        y = mx.argmax(logits, axis=-1)
        out.append(y)
        mx.eval(y)
    return mx.stack(out, axis=1)
