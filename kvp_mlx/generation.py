"""Text generation: a prefill method fills the cache, then mlx-lm's own loop decodes.

The data flow of one call, top to bottom:
1. the prompt becomes token ids as ``mlx_lm.generate`` makes them (kvp_mlx.prompting: chat template
   by default);
2. the method fills the decoder's cache with all but the last prompt token (``fill``: base, kvp,
   aux), and mlx-lm's ``generate_step`` runs the last token and decodes, so logits processors,
   ``max_kv_size``, quantized KV and the sampler act exactly as in mlx-lm; with a draft model
   (``draft="aux"`` reuses the auxiliary's cache that a ``kvp`` fill leaves behind) mlx-lm's
   ``speculative_generate_step`` decodes instead. A method that must see the whole prompt (token
   pruning, KV-Runahead) prefills it, the first token is sampled from its logits as mlx-lm samples,
   and ``generate_step`` continues from there;
3. tokens become text through the tokenizer's streaming detokenizer, as ``mlx_lm.stream_generate``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import (
    generate_step, generation_stream, maybe_quantize_kv_cache, speculative_generate_step, wired_limit,
)
from mlx_lm.models.cache import RotatingKVCache, can_trim_prompt_cache

from kvp_mlx.errors import KVPError
from kvp_mlx.methods import PrefillResult, get_method
from kvp_mlx.methods.base import fill_cache
from kvp_mlx.model import KVPModel
from kvp_mlx.prompting import Prompt, check_context, render_prompt
from kvp_mlx.sampling import SamplingOptions, sampling_options, with_history

DEFAULT_QUANTIZED_KV_START = 5000  # mlx-lm's default


@dataclass
class GenerationResponse:
    """mlx-lm's ``GenerationResponse`` fields, plus the time to first token and the prefill method."""

    text: str  # the new piece of text (may be empty while a multi-byte character is incomplete)
    token: int
    logprobs: mx.array  # [vocab] log-probabilities the token was sampled from
    from_draft: bool  # accepted from the draft model (speculative decoding)
    prompt_tokens: int
    prompt_tps: float  # prompt tokens / ttft_s
    generation_tokens: int
    generation_tps: float  # tokens/s after the first token
    peak_memory: float  # GB
    finish_reason: str | None  # "stop" (EOS), "length", or None while streaming
    ttft_s: float  # prompt token ids ready -> first token sampled and materialised, seconds
    method: str  # the prefill method


def default_method(model: KVPModel) -> str:
    """``kvp`` for a KV Prediction model, ``base`` for a plain mlx-lm directory."""
    return "kvp" if model.aux is not None and model.predictor is not None else "base"


def encode_prompt(model: KVPModel, prompt: Prompt, **render: Any) -> mx.array:
    """Token ids ``[T]`` of a prompt, rendered as mlx-lm renders it (see kvp_mlx.prompting)."""
    return mx.array(render_prompt(model.tokenizer, prompt, **render), dtype=mx.int32)


def _draft(model: KVPModel, method: str, draft: str | None, draft_model: nn.Module | None,
           filled_draft_cache: list | None, prefix: mx.array, prefill_step_size: int) -> tuple[nn.Module, list] | None:
    """The draft model and its cache of ``prefix`` (all but the last prompt token), if any."""
    if draft is None and draft_model is None:
        return None
    if draft is not None and draft_model is not None:
        raise KVPError("give either draft='aux' (--draft aux) or a draft model (--draft-model), not both")
    if draft is not None:
        if draft != "aux":
            raise KVPError(f"unknown draft '{draft}' (the only named draft is 'aux': the auxiliary model)")
        if model.aux is None:
            raise KVPError("--draft aux needs a KV Prediction model (this one has no auxiliary model)")
        if method == "aux":
            raise KVPError("--draft aux with --method aux would draft for the auxiliary with itself")
        if filled_draft_cache is not None:  # a kvp fill already holds the auxiliary's cache: free
            return model.aux, filled_draft_cache
        draft_model = model.aux
    assert draft_model is not None
    return draft_model, fill_cache(draft_model, prefix[None], prefill_step_size)


def stream_generate(
    model: KVPModel,
    prompt: Prompt,
    *,
    method: str | None = None,
    max_tokens: int = 256,
    seed: int | None = None,
    prefill_step_size: int = 2048,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    draft: str | None = None,
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = 3,
    system_prompt: str | None = None,
    use_chat_template: bool | None = None,
    chat_template_config: dict | None = None,
    prefill_response: str | None = None,
    strict_context: bool = False,
    sampling: SamplingOptions | None = None,
    method_options: dict | None = None,
    **sampling_kwargs: Any,
) -> Iterator[GenerationResponse]:
    """Prefill ``prompt`` with ``method`` (default: ``kvp``, ``base`` for a base-only model), then
    decode with mlx-lm's generation loop, streaming text pieces.

    Sampling options are mlx-lm's (``temp``, ``top_p``, ``min_p``, ``top_k``, ``min_tokens_to_keep``,
    ``xtc_probability``, ``xtc_threshold``, ``repetition_penalty``, ``presence_penalty``,
    ``frequency_penalty`` and their context sizes, ``logit_bias``), as keywords or as ``sampling``.
    The prefill method's own options go in ``method_options`` or as keywords (``schedule=`` for
    ``lazy``); an unknown keyword is a one-line error naming the method's options.
    """
    method = method or default_method(model)
    spec = get_method(method)
    # keywords that are not sampling options are the method's own (e.g. schedule= for lazy)
    sampling_names = set(SamplingOptions.__dataclass_fields__)
    own = {k: v for k, v in sampling_kwargs.items() if k not in sampling_names}
    sampling_kwargs = {k: v for k, v in sampling_kwargs.items() if k in sampling_names}
    options = spec.resolve_options({**(method_options or {}), **own})
    if sampling is not None and sampling_kwargs:
        raise KVPError("give sampling options either as keywords or as sampling=, not both")
    opts = sampling if sampling is not None else sampling_options(**sampling_kwargs)
    vocab = getattr(getattr(model.base, "args", None), "vocab_size", None)
    opts.check(vocab)
    _check_decoding(max_tokens, prefill_step_size, max_kv_size, kv_bits, kv_group_size, quantized_kv_start,
                    num_draft_tokens)
    if max_kv_size is not None and (draft is not None or draft_model is not None):
        raise KVPError("speculative decoding (--draft aux, --draft-model) needs trimmable caches: drop --max-kv-size")
    ids = encode_prompt(model, prompt, system_prompt=system_prompt, use_chat_template=use_chat_template,
                        chat_template_config=chat_template_config, prefill_response=prefill_response)
    warning = check_context(int(ids.size), model.base_config, strict_context)
    if warning:
        import sys

        print(f"warning: {warning}", file=sys.stderr)
    tokenizer = model.tokenizer
    sampler = opts.sampler(tokenizer.encode("\n") + list(tokenizer.eos_token_ids))
    processors = opts.logits_processors()
    if seed is not None:
        mx.random.seed(seed)
    mx.eval(ids)
    mx.reset_peak_memory()

    tic = time.perf_counter()
    if spec.fill is not None:
        # The method stops one token short; mlx-lm's loop runs the last prompt token.
        filled = spec.fill(model, ids[None, :-1], prefill_step_size=prefill_step_size, max_kv_size=max_kv_size,
                           **options)
        decoder, cache = filled.decoder, filled.cache
        maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)  # as mlx-lm after a prefill
        drafting = _draft(model, method, draft, draft_model, filled.draft_cache, ids[:-1], prefill_step_size)
        history = with_history(processors, ids[:-1])
        if drafting is None:
            steps = ((t, lp, False) for t, lp in generate_step(
                ids[-1:], decoder, max_tokens=max_tokens, sampler=sampler, logits_processors=history,
                prompt_cache=cache, prefill_step_size=prefill_step_size, kv_bits=kv_bits,
                kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start))
        else:
            draft_lm, draft_cache = drafting
            # a rotating cache (sliding-window layers) is trimmable only until it first wraps around
            windows = [c.max_size for c in cache + draft_cache if isinstance(c, RotatingKVCache)]
            if not can_trim_prompt_cache(cache) or not can_trim_prompt_cache(draft_cache):
                raise KVPError("speculative decoding needs trimmable caches (no --max-kv-size, no sliding-window "
                               "layers)")
            if windows and ids.size + max_tokens + num_draft_tokens > min(windows):
                raise KVPError(f"speculative decoding needs trimmable caches: prompt + max_tokens + num_draft_tokens "
                               f"({ids.size + max_tokens + num_draft_tokens}) must fit the sliding window "
                               f"({min(windows)} tokens)")
            maybe_quantize_kv_cache(draft_cache, quantized_kv_start, kv_group_size, kv_bits)
            steps = speculative_generate_step(
                ids[-1:], decoder, draft_lm, num_draft_tokens=num_draft_tokens, max_tokens=max_tokens,
                sampler=sampler, logits_processors=history, prompt_cache=cache + draft_cache,
                prefill_step_size=prefill_step_size, kv_bits=kv_bits, kv_group_size=kv_group_size,
                quantized_kv_start=quantized_kv_start)
    else:
        steps = _from_prefill_logits(model, method, spec.capabilities, ids, options, opts, sampler, processors,
                                     max_tokens, prefill_step_size, max_kv_size, kv_bits, draft, draft_model)
        decoder = model.base
    yield from _responses(steps, tokenizer, ids, max_tokens, tic, method, decoder)


def _check_decoding(max_tokens: int, prefill_step_size: int, max_kv_size: int | None, kv_bits: int | None,
                    kv_group_size: int, quantized_kv_start: int, num_draft_tokens: int) -> None:
    def positive(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KVPError(f"{name} must be a positive integer, got {value!r}")

    positive("max_tokens", max_tokens)
    positive("prefill_step_size", prefill_step_size)
    positive("num_draft_tokens", num_draft_tokens)
    if max_kv_size is not None:
        positive("max_kv_size", max_kv_size)
    if kv_bits is not None and kv_bits not in (2, 3, 4, 5, 6, 8):
        raise KVPError(f"kv_bits must be one of 2, 3, 4, 5, 6, 8, got {kv_bits!r}")
    if kv_group_size not in (32, 64, 128):
        raise KVPError(f"kv_group_size must be 32, 64 or 128, got {kv_group_size!r}")
    if isinstance(quantized_kv_start, bool) or not isinstance(quantized_kv_start, int) or quantized_kv_start < 0:
        raise KVPError(f"quantized_kv_start must be a non-negative integer, got {quantized_kv_start!r}")


def _from_prefill_logits(model, method, caps, ids, options, opts, sampler, processors, max_tokens,
                         prefill_step_size, max_kv_size, kv_bits, draft, draft_model):
    """Methods that prefill the whole prompt: the first token from their logits, then mlx-lm's loop."""
    unsupported = [name for name, given in (("max_kv_size", max_kv_size is not None), ("kv_bits", kv_bits is not None),
                                            ("a draft model", draft is not None or draft_model is not None)) if given]
    if unsupported:
        raise KVPError(f"method '{method}' prefills the whole prompt itself and does not support "
                       f"{', '.join(unsupported)}")
    result = model.prefill(ids[None], method=method, prefill_step_size=prefill_step_size, **options)
    assert isinstance(result, PrefillResult)
    logits = result.logits
    for p in processors:  # mlx-lm's first step sees the whole prompt
        logits = p(ids, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    first = sampler(logprobs)
    mx.eval(first)
    yield int(first.item()), logprobs[0], False
    if max_tokens > 1:
        for token, lp in generate_step(first, result.decoder, max_tokens=max_tokens - 1, sampler=sampler,
                                       logits_processors=with_history(processors, ids), prompt_cache=result.cache,
                                       prefill_step_size=prefill_step_size):
            yield token, lp, False


def _responses(steps: Iterator, tokenizer: Any, ids: mx.array, max_tokens: int, tic: float, method: str,
               decoder: nn.Module) -> Iterator[GenerationResponse]:
    """Token ids -> text pieces, as mlx_lm.stream_generate turns them (EOS ends; it is not text)."""
    detokenizer = tokenizer.detokenizer
    eos = set(tokenizer.eos_token_ids)
    ttft = prompt_tps = 0.0
    token, logprobs, from_draft, n = -1, mx.array([]), False, 0
    with wired_limit(decoder, [generation_stream]):  # type: ignore[list-item]  # mlx-lm passes the same
        for n, (token, logprobs, from_draft) in enumerate(steps):
            token = int(token)
            if n == 0:
                ttft = time.perf_counter() - tic
                prompt_tps = ids.size / ttft
                tic = time.perf_counter()
            if token in eos:
                break
            detokenizer.add_token(token)
            if n + 1 == max_tokens:
                break
            yield GenerationResponse(
                detokenizer.last_segment, token, logprobs, from_draft, int(ids.size), prompt_tps, n + 1,
                (n + 1) / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9, None, ttft, method,
            )
        detokenizer.finalize()
        yield GenerationResponse(
            detokenizer.last_segment, token, logprobs, from_draft, int(ids.size), prompt_tps, n + 1,
            (n + 1) / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9,
            "stop" if token in eos else "length", ttft, method,
        )


def generate(model: KVPModel, prompt: Prompt, *, verbose: bool = False, **kwargs: Any) -> str:
    """The whole continuation as one string; ``verbose`` streams it and prints mlx-lm's statistics
    (prompt and generation tokens/s, peak memory) with the time to first token and the method."""
    text, last = [], None
    if verbose:
        print("=" * 10)
    for last in stream_generate(model, prompt, **kwargs):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print("=" * 10)
        print_statistics(last)
    return "".join(text)


def print_statistics(last: GenerationResponse, label: str = "") -> None:
    tag = f"[{label}] " if label else ""
    print(f"{tag}Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
    print(f"{tag}Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
    print(f"{tag}Peak memory: {last.peak_memory:.3f} GB")
    print(f"{tag}TTFT: {last.ttft_s:.4f} s (method {last.method})")
