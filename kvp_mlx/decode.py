"""Decoding from a filled cache: the first token comes from the prefill's logits, the rest from
mlx-lm's generation loop (`generate_step`) running the decoder on its own cache."""

from __future__ import annotations

from typing import Callable, Iterator

import mlx.core as mx
from mlx_lm.generate import generate_step

from kvp_mlx.methods import PrefillResult

Sampler = Callable[[mx.array], mx.array]


def _logprobs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def stream_tokens(result: PrefillResult, sampler: Sampler, max_tokens: int) -> Iterator[int]:
    """Yield up to ``max_tokens`` token ids for a single prompt (B=1) from a prefill result."""
    if result.logits is not None and result.logits.shape[0] != 1:
        raise ValueError("stream_tokens decodes one prompt; use decode_greedy for a batch")
    if max_tokens < 1:
        return
    first = sampler(_logprobs(result.logits))
    first_id = int(first)
    yield first_id
    if max_tokens == 1:
        return
    steps = generate_step(
        mx.array([first_id]),
        result.decoder,
        prompt_cache=result.cache,
        sampler=sampler,
        max_tokens=max_tokens - 1,
    )
    for token, _ in steps:
        yield int(token)


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
