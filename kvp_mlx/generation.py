"""Text generation for apps: `stream_generate` yields text pieces with TTFT and token counts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from kvp_mlx.decode import stream_tokens
from kvp_mlx.errors import KVPError
from kvp_mlx.model import KVPModel


@dataclass
class GenerationResponse:
    text: str  # the new piece of text (may be empty while a multi-byte character is incomplete)
    token: int
    prompt_tokens: int
    ttft_s: float  # prompt token ids ready -> first token sampled and materialised
    generation_tokens: int
    generation_tps: float  # tokens/s after the first token
    peak_memory_gb: float
    method: str
    finish_reason: str | None = None  # "stop" (EOS), "length", or None while streaming


def encode_prompt(model: KVPModel, prompt: str | Sequence[int] | mx.array) -> mx.array:
    """Token ids ``[T]`` for a text prompt (BOS added as the tokenizer does) or ids as given."""
    if isinstance(prompt, str):
        if prompt == "":
            raise KVPError("empty prompt")
        tok = model.tokenizer
        add_special = tok.bos_token is None or not prompt.startswith(tok.bos_token)
        ids = tok.encode(prompt, add_special_tokens=add_special)
        return mx.array(ids, dtype=mx.int32)
    # mlx's stubs take lists and tuples, not any Sequence (numpy arrays work too)
    ids = mx.array(prompt) if not isinstance(prompt, mx.array) else prompt  # type: ignore[arg-type]
    if ids.size == 0:
        raise KVPError("empty prompt")
    return ids.reshape(-1).astype(mx.int32)


def stream_generate(
    model: KVPModel,
    prompt: str | Sequence[int] | mx.array,
    *,
    method: str = "kvp",
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    prefill_step_size: int = 2048,
    **method_options: Any,
) -> Iterator[GenerationResponse]:
    """Prefill with ``method``, then decode with the base model alone, streaming text pieces."""
    if max_tokens < 1:
        raise KVPError("max_tokens must be at least 1")
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    ids = encode_prompt(model, prompt)
    mx.eval(ids)
    mx.reset_peak_memory()
    detokenizer = model.tokenizer.detokenizer
    detokenizer.reset()
    eos = set(model.tokenizer.eos_token_ids)

    tic = time.perf_counter()
    result = model.prefill(ids[None], method=method, prefill_step_size=prefill_step_size, **method_options)
    ttft = 0.0
    n = 0
    token = -1
    for n, token in enumerate(stream_tokens(result, sampler, max_tokens), start=1):
        if n == 1:
            ttft = time.perf_counter() - tic
            tic = time.perf_counter()
        finished = token in eos
        if not finished:
            detokenizer.add_token(token)
        if finished or n == max_tokens:
            detokenizer.finalize()
        elapsed = time.perf_counter() - tic
        yield GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            prompt_tokens=int(ids.size),
            ttft_s=ttft,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            method=result.method,
            finish_reason="stop" if finished else ("length" if n == max_tokens else None),
        )
        if finished:
            return


def generate(
    model: KVPModel,
    prompt: str | Sequence[int] | mx.array,
    *,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """The whole continuation as one string (``verbose`` prints it as it streams, then TTFT)."""
    text, last = [], None
    for last in stream_generate(model, prompt, **kwargs):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(f"Prompt: {last.prompt_tokens} tokens, TTFT {last.ttft_s:.3f} s ({last.method})")
        print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.2f} tokens/s")
        print(f"Peak memory: {last.peak_memory_gb:.3f} GB")
    return "".join(text)
