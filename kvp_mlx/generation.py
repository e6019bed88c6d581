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

import difflib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import (
    generate_step, generation_stream, maybe_quantize_kv_cache, speculative_generate_step, wired_limit,
)
from mlx_lm.models.cache import RotatingKVCache, can_trim_prompt_cache

from kvp_mlx.errors import KVPError
from kvp_mlx.methods import FilledCache, MethodCall, PrefillModel, enter
from kvp_mlx.methods.base import fill_cache
from kvp_mlx.model import KVPModel
from kvp_mlx.prompting import Prompt, check_context, context_length, render_prompt
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


def encode_prompt(model: KVPModel, prompt: Prompt, **render: Any) -> mx.array:
    """Token ids ``[T]`` of a prompt, rendered as mlx-lm renders it (see kvp_mlx.prompting)."""
    return mx.array(render_prompt(model.tokenizer, prompt, **render), dtype=mx.int32)


def _draft(model: PrefillModel, method: str, draft: str | None, draft_model: nn.Module | None,
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


@dataclass(frozen=True)
class Decoding:
    """How to decode after the prefill: mlx-lm's ``generate_step`` options, the draft, the sampling."""

    max_tokens: int = 256
    prefill_step_size: int = 2048
    max_kv_size: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = 64
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START
    draft: str | None = None
    draft_model: nn.Module | None = None
    num_draft_tokens: int = 3
    seed: int | None = None
    sampling: SamplingOptions = SamplingOptions()
    prompt_progress_callback: Callable[[int, int], None] | None = None  # (processed, total): kvp_mlx.progress

    def check(self, vocab_size: int | None = None) -> None:
        self.sampling.check(vocab_size)
        check_decoding(self.max_tokens, self.prefill_step_size, self.max_kv_size, self.kv_bits,
                       self.kv_group_size, self.quantized_kv_start, self.num_draft_tokens)
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
            raise KVPError(f"seed must be a non-negative integer below 2**64, got {seed!r}")
        if self.max_kv_size is not None and (self.draft is not None or self.draft_model is not None):
            # a rotating cache can be rewound only until it first wraps around
            raise KVPError("speculative decoding (--draft aux, --draft-model) needs trimmable caches: "
                           "drop --max-kv-size")

    @property
    def kv_quantization(self) -> dict[str, Any]:
        return dict(kv_bits=self.kv_bits, kv_group_size=self.kv_group_size,
                    quantized_kv_start=self.quantized_kv_start)


RENDER_KEYS = ("system_prompt", "use_chat_template", "chat_template_config", "prefill_response")
DECODING_KEYS = tuple(k for k in Decoding.__dataclass_fields__ if k != "sampling")
SAMPLING_KEYS = tuple(SamplingOptions.__dataclass_fields__)
GENERATION_KEYWORDS = (*RENDER_KEYS, *DECODING_KEYS, *SAMPLING_KEYS, "sampling", "method_options", "method",
                       "strict_context", "context_warning")


def split_generation_kwargs(model: KVPModel, method: str | None, kwargs: dict[str, Any],
                            method_options: dict | None = None, sampling: SamplingOptions | None = None,
                            warm: bool = False) -> tuple[MethodCall, Decoding, dict]:
    """(the entered method, :class:`Decoding`, prompt-rendering options) from the keywords of
    :func:`stream_generate`. A keyword that is neither a generation keyword nor an option of the
    method is a one-line error naming the valid ones."""
    render = {k: kwargs.pop(k) for k in RENDER_KEYS if k in kwargs}
    decoding = {k: kwargs.pop(k) for k in DECODING_KEYS if k in kwargs}
    picked = {k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING_KEYS}
    if sampling is not None and picked:
        raise KVPError("give sampling options either as keywords or as sampling=, not both")
    call = enter(model, method, None, warm=warm)  # the model's fitness for the method comes first
    unknown = [k for k in kwargs if k not in {o.name for o in call.spec.options}]
    if unknown:
        raise unknown_keyword(unknown[0], call)
    call = enter(model, method, {**(method_options or {}), **kwargs}, warm=warm)
    dec = Decoding(**decoding, sampling=sampling if sampling is not None else sampling_options(**picked))
    dec.check(getattr(getattr(model.base, "args", None), "vocab_size", None))
    return call, dec, render


def unknown_keyword(name: str, call: MethodCall) -> KVPError:
    """The error for a keyword :func:`stream_generate` does not take, with the nearest valid one."""
    own = [o.name for o in call.spec.options]
    valid = sorted(GENERATION_KEYWORDS)
    close = difflib.get_close_matches(name, valid + own, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    options = f"its options: {', '.join(own)}" if own else "it has no options"
    return KVPError(f"unknown keyword '{name}'{hint}; generation keywords: {', '.join(valid)}; "
                    f"method '{call.name}': {options}")


def stream_generate(
    model: KVPModel,
    prompt: Prompt,
    *,
    method: str | None = None,
    strict_context: bool = False,
    context_warning: bool = True,
    sampling: SamplingOptions | None = None,
    method_options: dict | None = None,
    **kwargs: Any,
) -> Iterator[GenerationResponse]:
    """Prefill ``prompt`` with ``method`` (default: ``kvp``, ``base`` for a base-only model), then
    decode with mlx-lm's generation loop, streaming text pieces.

    Keywords: decoding as mlx-lm's (``max_tokens``, ``prefill_step_size``, ``max_kv_size``,
    ``kv_bits``, ``kv_group_size``, ``quantized_kv_start``, ``seed``), a draft (``draft="aux"`` or
    ``draft_model=``, ``num_draft_tokens``), prompt rendering (``system_prompt``,
    ``use_chat_template``, ``chat_template_config``, ``prefill_response``), sampling as mlx-lm's
    (``temp``, ``top_p``, ``min_p``, ``top_k``, ``min_tokens_to_keep``, ``xtc_probability``,
    ``xtc_threshold``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty`` and their
    context sizes, ``logit_bias``; or ``sampling=SamplingOptions(...)``), and mlx-lm's
    ``prompt_progress_callback(processed, total)`` (the fill's chunks; see kvp_mlx.progress).
    Any other keyword must be an option of the prefill method (``schedule=`` for ``lazy``), also accepted as
    ``method_options``; an unknown one is a one-line error naming the valid keywords. A method the
    model cannot run (``kvp`` on a base-only directory) is a one-line error. A prompt longer than the model's
    context is a warning (``context_warning=False``: none) or, with ``strict_context``, an error.
    """
    call, dec, render = split_generation_kwargs(model, method, dict(kwargs), method_options, sampling)
    ids = encode_prompt(model, prompt, **render)
    if context_warning or strict_context:
        warn_context(int(ids.size), model, strict_context)
    mx.eval(ids)
    tic = time.perf_counter()
    steps = token_stream(call, ids, dec, context_warning=context_warning)
    yield from _responses(steps, model.tokenizer, int(ids.size), dec.max_tokens, tic, call.name, call.decoder)


def warn_context(n_tokens: int, model: KVPModel, strict: bool) -> None:
    warning = check_context(n_tokens, model.base_config, strict)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def token_stream(call: MethodCall, ids: mx.array, dec: Decoding, warm: FilledCache | None = None,
                 on_fill: Callable[[FilledCache], None] | None = None,
                 context_warning: bool = True) -> Iterator[tuple[Any, mx.array, bool]]:
    """(token, logprobs, from_draft) for the prompt ``ids`` [T]: the method fills the cache (``warm``:
    a conversation's caches, extended in place to hold ``ids[:-1]``), then mlx-lm's loop runs the
    last token and decodes. ``on_fill`` sees the filled caches before decoding starts. Decoding past
    the model's context warns once on stderr (``context_warning=False``: not)."""
    call.check_ids(ids)  # the whole prompt: mlx-lm's loop runs the last token unchecked
    steps = _token_steps(call, ids, dec, warm, on_fill)
    found = context_length(getattr(call.model, "base_config", {})) if context_warning else None
    if found is None or ids.size > found[0]:  # no context known, or the prompt already warned
        yield from steps
        return
    limit, key = found
    try:
        for n, step in enumerate(steps, 1):
            if ids.size + n == limit + 1:
                print(f"warning: decoding passed the model's context of {limit} tokens ({key}) at generated "
                      f"token {n}; expect degraded output", file=sys.stderr)
            yield step
    finally:
        steps.close()  # type: ignore[attr-defined]  # a generator


def _token_steps(call: MethodCall, ids: mx.array, dec: Decoding, warm: FilledCache | None,
                 on_fill: Callable[[FilledCache], None] | None) -> Iterator[tuple[Any, mx.array, bool]]:
    model = call.model
    if dec.seed is not None:
        mx.random.seed(dec.seed)
    mx.reset_peak_memory()
    tokenizer = model.tokenizer
    sampler = dec.sampling.sampler(tokenizer.encode("\n") + list(tokenizer.eos_token_ids))
    processors = dec.sampling.logits_processors()
    if not call.fills:
        if warm is not None:
            raise KVPError(f"method '{call.name}' cannot extend a warm cache (it prefills whole prompts)")
        yield from _from_prefill_logits(call, ids, sampler, processors, dec)
        return
    # The method stops one token short; mlx-lm's loop runs the last prompt token.
    filled = call.fill(ids[None, :-1], dec.prefill_step_size, dec.max_kv_size, warm,
                       progress=dec.prompt_progress_callback)
    if on_fill is not None:
        on_fill(filled)
    cache = filled.cache
    maybe_quantize_kv_cache(cache, dec.quantized_kv_start, dec.kv_group_size, dec.kv_bits)  # as mlx-lm's prefill
    drafting = _draft(model, call.name, dec.draft, dec.draft_model, filled.draft_cache, ids[:-1],
                      dec.prefill_step_size)
    history = with_history(processors, ids[:-1])
    if drafting is None:
        for token, logprobs in generate_step(
            ids[-1:], filled.decoder, max_tokens=dec.max_tokens, sampler=sampler, logits_processors=history,
            prompt_cache=cache, prefill_step_size=dec.prefill_step_size, **dec.kv_quantization,
        ):
            yield token, logprobs, False
        return
    draft_lm, draft_cache = drafting
    if not can_trim_prompt_cache(cache) or not can_trim_prompt_cache(draft_cache):
        raise KVPError("speculative decoding needs trimmable caches (no --max-kv-size, no sliding-window layers)")
    # a rotating cache (sliding-window layers) is trimmable only until it first wraps around
    windows = [c.max_size for c in cache + draft_cache if isinstance(c, RotatingKVCache)]
    reach = ids.size + dec.max_tokens + dec.num_draft_tokens
    if windows and reach > min(windows):
        raise KVPError(f"speculative decoding needs trimmable caches: prompt + max_tokens + num_draft_tokens "
                       f"({reach}) must fit the sliding window ({min(windows)} tokens)")
    maybe_quantize_kv_cache(draft_cache, dec.quantized_kv_start, dec.kv_group_size, dec.kv_bits)
    yield from speculative_generate_step(
        ids[-1:], filled.decoder, draft_lm, num_draft_tokens=dec.num_draft_tokens, max_tokens=dec.max_tokens,
        sampler=sampler, logits_processors=history, prompt_cache=cache + draft_cache,
        prefill_step_size=dec.prefill_step_size, **dec.kv_quantization,
    )


def check_decoding(max_tokens: int, prefill_step_size: int, max_kv_size: int | None, kv_bits: int | None,
                   kv_group_size: int, quantized_kv_start: int, num_draft_tokens: int) -> None:
    """One-line errors for decoding options out of range (before any work is done)."""

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


def _from_prefill_logits(call: MethodCall, ids: mx.array, sampler: Any, processors: list,
                         dec: Decoding) -> Iterator[tuple[Any, mx.array, bool]]:
    """Methods that prefill the whole prompt: the first token from their logits, then mlx-lm's loop."""
    method = call.name
    unsupported = [name for name, given in (("max_kv_size", dec.max_kv_size is not None),
                                            ("kv_bits", dec.kv_bits is not None),
                                            ("a draft model", dec.draft is not None or dec.draft_model is not None))
                   if given]
    if unsupported:
        raise KVPError(f"method '{method}' prefills the whole prompt itself and does not support "
                       f"{', '.join(unsupported)}")
    result = call.prefill_to_decode(ids[None], dec.prefill_step_size)
    logits = result.logits
    for p in processors:  # mlx-lm's first step sees the whole prompt
        logits = p(ids, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    first = sampler(logprobs)
    mx.eval(first)
    yield int(first.item()), logprobs[0], False
    if dec.max_tokens > 1:
        for token, lp in generate_step(first, result.decoder, max_tokens=dec.max_tokens - 1, sampler=sampler,
                                       logits_processors=with_history(processors, ids), prompt_cache=result.cache,
                                       prefill_step_size=dec.prefill_step_size):
            yield token, lp, False


def _responses(steps: Iterator, tokenizer: Any, prompt_tokens: int, max_tokens: int, tic: float, method: str,
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
                prompt_tps = prompt_tokens / ttft
                tic = time.perf_counter()
            if token in eos:
                break
            detokenizer.add_token(token)
            if n + 1 == max_tokens:
                break
            yield GenerationResponse(
                detokenizer.last_segment, token, logprobs, from_draft, prompt_tokens, prompt_tps, n + 1,
                (n + 1) / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9, None, ttft, method,
            )
        detokenizer.finalize()
        yield GenerationResponse(
            detokenizer.last_segment, token, logprobs, from_draft, prompt_tokens, prompt_tps, n + 1,
            (n + 1) / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9,
            "stop" if token in eos else "length", ttft, method,
        )


def generate(model: KVPModel, prompt: Prompt, *, verbose: bool = False, **kwargs: Any) -> str:
    """The whole continuation as one string; ``verbose`` streams it and prints mlx-lm's statistics
    (prompt and generation tokens/s, peak memory) with the time to first token and the method."""
    text: list[str] = []
    last = None
    for last in stream_generate(model, prompt, **kwargs):
        if verbose and not text:
            print("=" * 10)  # after the checks: an error leaves stdout empty
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
