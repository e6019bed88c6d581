"""A conversation: caches kept turn after turn, KV Prediction of only the new tokens, exact repair.

A :class:`Session` holds every token so far, the decoder's cache (mlx-lm's, from
``make_prompt_cache``) holding all of them, the auxiliary's own cache (``kvp``: it lags behind,
having not seen the replies), and which base positions hold predicted rather than exact K/V. A turn
renders only the new message (the chat-template delta, as ``mlx_lm.chat`` renders it), lets the
session's method fill what the caches lack (``kvp``: the auxiliary catches up, the predictor maps the
new positions, they are written at their true positions), and decodes with mlx-lm's loop, which
feeds every generated token into the cache. ``repair`` recomputes exact base K/V from the first
predicted position on, so later turns attend to an exact history; it can be stopped between chunks
and resumed (a server repairs while idle). See ../shared/docs/conversations.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import mlx.core as mx
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from kvp_mlx.errors import KVPError
from kvp_mlx.generation import (
    GenerationResponse, _responses, default_method, split_generation_kwargs, token_stream, warn_context,
)
from kvp_mlx.methods import FilledCache, get_method
from kvp_mlx.methods.base import held_positions
from kvp_mlx.model import KVPModel
from kvp_mlx.prompting import Message, render_prompt

if TYPE_CHECKING:
    from kvp_mlx.epicache.memory import BoundedMemory, CompressReport


@dataclass
class TurnStats:
    """What one turn cost and reused."""

    reused_tokens: int  # positions the decoder's cache already held
    prefilled_tokens: int  # positions the method filled this turn (new message + previous reply's tail)
    predicted: tuple[int, int] | None  # base positions written with predicted K/V this turn
    generated_tokens: int = 0
    ttft_s: float = 0.0


@dataclass
class RepairReport:
    """What :meth:`Session.repair` did."""

    start: int  # the first position recomputed (the first predicted one)
    end: int  # one past the last position recomputed so far
    positions: int  # positions recomputed by this call
    seconds: float
    complete: bool  # False: stopped between chunks; the next repair() resumes


@dataclass
class _RepairState:
    cache: list  # exact cache of tokens[:position]
    start: int
    position: int


@dataclass
class Session:
    """A conversation with ``model``; ``method`` must be able to extend a warm cache (base, kvp, aux).

    ``max_kv_size`` is fixed for the session's life (its caches are built with it). ``system_prompt``
    goes into the first turn's chat template. ``kv``: a
    :class:`~kvp_mlx.epicache.memory.BoundedMemory` keeps the history within a KV budget (EpiCache
    or a baseline policy; method ``base``): turns are routed to its episode caches and
    :meth:`compress` evicts between turns.
    """

    model: KVPModel
    method: str | None = None
    max_kv_size: int | None = None
    system_prompt: str | None = None
    prefill_step_size: int = 2048
    method_options: dict = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    predicted: list[tuple[int, int]] = field(default_factory=list)  # [start, end) base positions
    turns: list[TurnStats] = field(default_factory=list)
    caches: FilledCache | None = None
    kv: "BoundedMemory | None" = None
    _repair: _RepairState | None = None

    def __post_init__(self) -> None:
        if self.kv is not None:
            if self.method not in (None, "base"):
                raise KVPError(f"a KV budget compresses the base model's own cache: it runs with method 'base', "
                               f"not '{self.method}'")
            if self.max_kv_size is not None:
                raise KVPError("a KV budget and max_kv_size both bound the cache: use one of them")
            self.method = "base"
        self.method = self.method or default_method(self.model)
        spec = get_method(self.method)
        if spec.fill is None or not spec.capabilities.extends_cache:
            raise KVPError(
                f"method '{self.method}' cannot extend a warm cache: every turn would re-prefill the whole "
                "history (cold). Sessions run base, kvp or aux; use generate for one cold prompt"
            )
        self.method_options = spec.resolve_options(self.method_options)
        if self.caches is None and self.kv is not None:
            self.caches = FilledCache(self.kv.cache, self.model.base)
        if self.caches is None:
            self.caches = spec.fill(self.model, mx.zeros((1, 0), dtype=mx.int32), max_kv_size=self.max_kv_size,
                                    prefill_step_size=self.prefill_step_size, **self.method_options)

    # --- state ---------------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Positions the decoder's cache holds (every token of the session)."""
        assert self.caches is not None
        return held_positions(self.caches.cache)

    @property
    def first_predicted(self) -> int | None:
        return min((s for s, _ in self.predicted), default=None)

    def predicted_positions(self) -> int:
        return sum(e - s for s, e in self.predicted)

    def reset(self) -> None:
        """Forget the conversation (fresh caches)."""
        self.tokens, self.predicted, self.turns, self.caches, self._repair = [], [], [], None, None
        if self.kv is not None:
            self.kv.reset()
        self.__post_init__()

    # --- a turn --------------------------------------------------------------------------------

    def render(self, prompt: str | list[Message] | list[int], use_chat_template: bool | None = None,
               chat_template_config: dict | None = None, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a new turn: the new message alone through the chat template, with the
        generation prompt (as ``mlx_lm.chat``); the system prompt only in the first turn. Raw text
        (no template) gets the tokenizer's special tokens in the first turn only."""
        if isinstance(prompt, (list, tuple)) and len(prompt) == 0:
            if not self.tokens:
                raise KVPError("empty prompt")
            return []  # nothing new: the turn regenerates the reply to the history (after trim)
        tokenizer = self.model.tokenizer
        first = not self.tokens
        has_template = bool(getattr(tokenizer, "has_chat_template", False))
        templated = has_template if use_chat_template is None else use_chat_template
        if isinstance(prompt, str) and not templated:
            if prompt == "":
                raise KVPError("empty prompt")
            return list(tokenizer.encode(prompt, add_special_tokens=first))
        return render_prompt(tokenizer, prompt, system_prompt=self.system_prompt if first else None,
                             use_chat_template=use_chat_template, chat_template_config=chat_template_config,
                             add_generation_prompt=add_generation_prompt)

    def stream_generate(self, prompt: str | list[Message] | list[int], **kwargs: Any) -> Iterator[GenerationResponse]:
        """One turn: render the new message, fill what the caches lack with the session's method,
        decode with mlx-lm's loop; the reply stays in the history. Keywords as
        :func:`kvp_mlx.generation.stream_generate` (no draft; ``max_kv_size`` is the session's)."""
        if "max_kv_size" in kwargs and kwargs.pop("max_kv_size") != self.max_kv_size:
            raise KVPError("max_kv_size is fixed when the session is created")
        strict = kwargs.pop("strict_context", False)
        render = {k: kwargs.pop(k) for k in ("use_chat_template", "chat_template_config") if k in kwargs}
        if "system_prompt" in kwargs or "prefill_response" in kwargs:
            raise KVPError("a session takes its system prompt when created (Session(..., system_prompt=...))")
        kwargs.setdefault("prefill_step_size", self.prefill_step_size)
        spec, options, dec, _ = split_generation_kwargs(
            self.model, self.method, dict(kwargs, max_kv_size=self.max_kv_size), self.method_options)
        if dec.draft is not None or dec.draft_model is not None:
            raise KVPError("speculative decoding is not available in sessions yet")
        new = self.render(prompt, **render)
        ids = self.tokens + new
        warn_context(len(ids), self.model, strict)
        if self.kv is not None:
            # decoding feeds the last prompt token and every reply token into the cache
            held = self.kv.before_turn(self, prompt, ids, max(len(ids) - 1, 0), dec.max_tokens + 1)
        assert self.caches is not None
        if self.offset >= len(ids):  # nothing new (a regenerated reply): run the last token again
            self._trim_caches(self.offset - len(ids) + 1)
        reused = self.offset if self.kv is None else min(held, self.offset)
        stats = TurnStats(reused, len(ids) - reused, None)
        recorded: list[int] = []

        def on_fill(filled: FilledCache) -> None:
            self.caches = filled
            if filled.predicted is not None:
                self._add_predicted(filled.predicted)
                stats.predicted = filled.predicted

        def record(steps: Iterator) -> Iterator:
            for step in steps:
                recorded.append(int(step[0]))
                yield step

        tic = time.perf_counter()
        steps = token_stream(self.model, spec, options, mx.array(ids, dtype=mx.int32), dec, warm=self.caches,
                             on_fill=on_fill)
        decoder = self.caches.decoder
        last = None
        try:
            for last in _responses(record(steps), self.model.tokenizer, len(ids) - reused, dec.max_tokens, tic,
                                   spec.name, decoder):
                yield last
        finally:
            self._settle(ids + recorded)
            stats.generated_tokens = len(recorded)
            stats.ttft_s = last.ttft_s if last is not None else 0.0
            self.turns.append(stats)
            if self.kv is not None:
                self.kv.after_turn(prompt, recorded)

    def generate(self, prompt: str | list[Message] | list[int], **kwargs: Any) -> str:
        return "".join(r.text for r in self.stream_generate(prompt, **kwargs))

    def prefill(self, prompt: str | list[Message] | list[int], use_chat_template: bool | None = None) -> TurnStats:
        """Add a prompt to the caches without generating (``kvp-mlx cache-prompt``): the whole
        message is filled by the session's method. Through a chat template it is a complete user
        turn without the generation prompt (the next turn's message follows it)."""
        new = self.render(prompt, use_chat_template=use_chat_template, add_generation_prompt=False)
        ids = self.tokens + new
        spec = get_method(self.method or "base")
        reused = self.offset
        if self.kv is not None:
            reused = self.kv.before_turn(self, prompt, ids, len(ids), 0)
        assert spec.fill is not None  # checked when the session was made
        filled = spec.fill(self.model, mx.array([ids], dtype=mx.int32), prefill_step_size=self.prefill_step_size,
                           max_kv_size=self.max_kv_size, warm=self.caches, **self.method_options)
        self.caches = filled
        stats = TurnStats(reused, len(ids) - reused, filled.predicted)
        if filled.predicted is not None:
            self._add_predicted(filled.predicted)
        self._settle(ids)
        self.turns.append(stats)
        if self.kv is not None:
            self.kv.after_turn(prompt, None)
        return stats

    def score(self, prompt: str | list[Message] | list[int], continuation: list[int]) -> mx.array:
        """Teacher forcing: add ``prompt`` as a turn (filled by the session's method) and feed the
        true ``continuation`` through the decoder as if it had been generated; returns the
        log-probabilities ``[len(continuation), vocab]`` the decoder gave each continuation token.
        The continuation stays in the history (the accuracy report's turns)."""
        if not continuation:
            raise KVPError("score needs a non-empty continuation")
        new = self.render(prompt)
        ids = self.tokens + new
        spec = get_method(self.method or "base")
        held = None
        if self.kv is not None:
            held = self.kv.before_turn(self, prompt, ids, len(ids) - 1, len(continuation) + 1)
        assert spec.fill is not None and self.caches is not None
        reused = self.offset if held is None else min(held, self.offset)
        if reused >= len(ids):
            self._trim_caches(reused - len(ids) + 1)
            reused = self.offset
        filled = spec.fill(self.model, mx.array([ids[:-1]], dtype=mx.int32), prefill_step_size=self.prefill_step_size,
                           max_kv_size=self.max_kv_size, warm=self.caches, **self.method_options)
        self.caches = filled
        if filled.predicted is not None:
            self._add_predicted(filled.predicted)
        fed = [ids[-1], *continuation]
        logits = filled.decoder(mx.array([fed], dtype=mx.int32), cache=filled.cache)[0, :-1].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(logprobs)
        self._settle(ids + list(continuation))
        self.turns.append(TurnStats(reused, len(ids) - reused, filled.predicted, len(continuation)))
        if self.kv is not None:
            self.kv.after_turn(prompt, continuation)
        return logprobs

    def compress(self, should_stop: Callable[[], bool] | None = None) -> "CompressReport":
        """A KV-budget session's work between turns (:meth:`BoundedMemory.compress`): evict back to
        the budget, bring other episodes' caches up to date; stops between caches when
        ``should_stop()`` (the next turn does what is left, or the next call)."""
        if self.kv is None:
            raise KVPError("this session has no KV budget: nothing to compress")
        report = self.kv.compress(self, should_stop)
        self.caches = FilledCache(self.kv.cache, self.model.base)
        return report

    def _settle(self, tokens: list[int]) -> None:
        """After a turn (finished, stopped early or failed): the history is what the cache holds."""
        assert self.caches is not None
        held = self.offset
        if held > len(tokens):
            raise KVPError(f"internal: the cache holds {held} positions but the session knows {len(tokens)} tokens")
        self.tokens = list(tokens[:held])
        self.predicted = [(s, min(e, held)) for s, e in self.predicted if s < held]
        aux = self.caches.draft_cache
        if aux is not None and held_positions(aux) > held:  # interrupted between the auxiliary and the base
            if can_trim_prompt_cache(aux):
                trim_prompt_cache(aux, held_positions(aux) - held)
            else:
                self.caches.draft_cache = None  # rebuilt from position 0 by the next kvp turn

    def _add_predicted(self, span: tuple[int, int]) -> None:
        if span[1] > span[0]:
            self.predicted.append(span)

    # --- repair and trim -------------------------------------------------------------------------

    def repair(self, should_stop: Callable[[], bool] | None = None,
               prefill_step_size: int | None = None) -> RepairReport:
        """Recompute exact base K/V from the first predicted position to the end, chunk by chunk.

        Generated tokens after a predicted position attended to predicted K/V, so they are redone
        too. The exact cache is built beside the live one and swapped in at the end, so a stop
        between chunks (``should_stop()`` true) leaves the session usable; the next call resumes.
        Afterwards the session's next-token logits equal a base session's on the same tokens.
        """
        tic = time.perf_counter()
        step = prefill_step_size or self.prefill_step_size
        state = self._repair
        if state is None:
            start = self.first_predicted
            if start is None:
                return RepairReport(self.offset, self.offset, 0, 0.0, True)
            state = self._repair = self._start_repair(start)
        base = self.model.base
        done = 0
        end = len(self.tokens)
        while state.position < end:
            if should_stop is not None and should_stop():
                return RepairReport(state.start, state.position, done, time.perf_counter() - tic, False)
            chunk = self.tokens[state.position : state.position + step]
            base(mx.array([chunk], dtype=mx.int32), cache=state.cache)
            mx.eval([c.state for c in state.cache])
            state.position += len(chunk)
            done += len(chunk)
        assert self.caches is not None
        self.caches = FilledCache(state.cache, base, self.caches.draft_cache)
        self.predicted, self._repair = [], None
        return RepairReport(state.start, state.position, done, time.perf_counter() - tic, True)

    def _start_repair(self, start: int) -> _RepairState:
        """An exact copy of the cache up to ``start`` (plain KVCache layers), or a fresh cache."""
        assert self.caches is not None
        live = self.caches.cache
        if all(type(c) is KVCache for c in live):
            cache = []
            for c in live:
                copy = KVCache()
                copy.state = (c.keys[..., :start, :], c.values[..., :start, :], start)
                cache.append(copy)
            return _RepairState(cache, start, start)
        # sliding-window or quantized layers: no exact prefix to keep; recompute from position 0
        return _RepairState(make_prompt_cache(self.model.base, self.max_kv_size), start, 0)

    def trim(self, n: int) -> None:
        """Drop the last ``n`` tokens (regenerate or edit a turn), where the caches allow it."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(self.tokens):
            raise KVPError(f"can trim 0 to {len(self.tokens)} tokens, got {n!r}")
        self._trim_caches(n)
        keep = len(self.tokens) - n
        self.tokens = self.tokens[:keep]
        self.predicted = [(s, min(e, keep)) for s, e in self.predicted if s < keep]
        if self._repair is not None and self._repair.position > keep:
            self._repair = None

    def _trim_caches(self, n: int) -> None:
        assert self.caches is not None
        if self.kv is not None:
            keep = self.offset - n
            if n > self.kv.tail(self.caches.cache):
                raise KVPError(f"cannot trim {n} positions: only the {self.kv.tail(self.caches.cache)} appended "
                               "since the last compression can be dropped (the rest were evicted or merged)")
            for other in self.kv.caches:
                extra = self.kv.held(other) - keep
                if other is not self.caches.cache and extra > 0:
                    if extra > self.kv.tail(other):
                        raise KVPError("cannot trim into an episode cache's compressed history")
                    trim_prompt_cache(other, extra)
        if not can_trim_prompt_cache(self.caches.cache):
            raise KVPError("this session's cache cannot be trimmed (sliding-window or rotating layers); reset it")
        trim_prompt_cache(self.caches.cache, n)
        keep = self.offset
        aux = self.caches.draft_cache
        if aux is not None and held_positions(aux) > keep:
            if can_trim_prompt_cache(aux):
                trim_prompt_cache(aux, held_positions(aux) - keep)
            else:
                self.caches.draft_cache = None

    # --- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the session (both caches, tokens, predicted positions, the model's identity)
        atomically to ``path`` (a ``.safetensors`` file)."""
        from kvp_mlx.session_file import save_session

        return save_session(self, Path(path))

    @classmethod
    def load(cls, model: KVPModel, path: str | Path) -> "Session":
        """A session saved by :meth:`save`, refused with one line if it belongs to another model or
        the file is truncated or corrupt."""
        from kvp_mlx.session_file import load_session

        return load_session(cls, model, Path(path))
