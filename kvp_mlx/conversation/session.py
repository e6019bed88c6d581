"""A conversation: caches kept turn after turn, KV Prediction of only the new tokens, exact repair.

A :class:`Session` holds every token so far, the decoder's cache (mlx-lm's, from
``make_prompt_cache``) holding all of them, the auxiliary's own cache (``kvp``: it lags behind,
having not seen the replies), and which base positions hold predicted rather than exact K/V. A turn
renders only the new message (the chat-template delta, as ``mlx_lm.chat`` renders it), lets the
session's method fill what the caches lack (``kvp``: the auxiliary catches up, the predictor maps the
new positions, they are written at their true positions), and decodes with mlx-lm's loop, which
feeds every generated token into the cache. ``repair`` recomputes exact base K/V from the first
predicted position on, so later turns attend to an exact history; it can be stopped between chunks
and resumed (a server repairs while idle). See the conversations note in the project documentation.

Every operation is atomic: a turn (``stream_generate``, ``prefill``, ``score``), a repair chunk, a
compression or a trim either completes or leaves the session exactly as it was (tokens, caches,
predicted spans, repair and memory state), whatever stops it: an exception from the model, a
sampler or a logits processor, ``KeyboardInterrupt``, or an exception thrown into a turn's stream
(``steps.throw(exc)``). Only ``close()`` on a turn's stream keeps the reply so far, as a shorter
reply whose tokens, caches and spans agree (a server's stop words and cancellations rely on it).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from kvp_mlx.conversation.checkpoint import CacheMark
from kvp_mlx.conversation.turn_memory import TurnMemory
from kvp_mlx.errors import KVPError
from kvp_mlx.generation import GenerationResponse, _responses, split_generation_kwargs, token_stream, warn_context
from kvp_mlx.methods import FilledCache, MethodCall, enter
from kvp_mlx.methods.base import counted_positions, held_positions
from kvp_mlx.model import KVPModel
from kvp_mlx.prompting import Message, checked_text, render_prompt

TurnInput = str | list[Message] | list[int]  # a new turn: text, chat messages or token ids


def clip_spans(spans: Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """Position spans ``[start, end)`` cut to the first ``n`` positions (spans beyond them dropped)."""
    return [(s, min(e, n)) for s, e in spans if s < n]


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
class _Mark:
    """A session as it was before an operation (:meth:`Session._mark`)."""

    tokens: list[int]
    predicted: list[tuple[int, int]]
    turns: int
    caches: FilledCache
    repair: _RepairState | None
    repair_position: int
    cache_marks: list[CacheMark]
    memory: Any


@dataclass
class Session:
    """A conversation with ``model``; ``method`` must be able to extend a warm cache (base, kvp, aux).

    ``max_kv_size`` is fixed for the session's life (its caches are built with it). ``system_prompt``
    goes into the first turn's chat template. ``kv``: a bounded memory (:class:`TurnMemory`, e.g.
    :class:`~kvp_mlx.epicache.memory.BoundedMemory`) keeps the history within a KV budget (EpiCache
    or a baseline policy; method ``base``): turns run on the cache it chooses and :meth:`compress`
    evicts between turns.
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
    kv: TurnMemory | None = None
    _repair: _RepairState | None = None
    _call: MethodCall | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.system_prompt is not None and not getattr(self.model.tokenizer, "has_chat_template", False):
            raise KVPError("a system prompt needs the chat template (this tokenizer has none)")
        if self.kv is not None:
            if self.method not in (None, "base"):
                raise KVPError(f"a KV budget compresses the base model's own cache: it runs with method 'base', "
                               f"not '{self.method}'")
            if self.max_kv_size is not None:
                raise KVPError("a KV budget and max_kv_size both bound the cache: use one of them")
            self.method = "base"
        self._call = enter(self.model, self.method, self.method_options, warm=True)
        self.method, self.method_options = self._call.name, self._call.options
        if self.caches is None and self.kv is not None:
            self.caches = FilledCache(self.kv.cache, self.model.base)
        if self.caches is None:
            self.caches = self._call.fill(mx.zeros((1, 0), dtype=mx.int32), self.prefill_step_size, self.max_kv_size)

    @classmethod
    def resume(cls, model: KVPModel, tokens: Sequence[int], cache: list | None = None, *,
               kv: TurnMemory | None = None, **options: Any) -> "Session":
        """A ``base`` session whose base cache already holds ``tokens`` (e.g. a compressed history):
        ``cache``, or the cache the bounded memory ``kv`` runs the next turn on."""
        if (cache is None) == (kv is None):
            raise KVPError("resume a session from a cache or from a bounded memory (one of them)")
        held = counted_positions(cache if cache is not None else kv.cache)  # type: ignore[union-attr]  # one is set
        if held is not None and held != len(tokens):  # None: recurrent states, which count no positions
            raise KVPError(f"the cache holds {held} positions for {len(tokens)} tokens")
        caches = FilledCache(cache, model.base) if cache is not None else None
        return cls(model, method="base", tokens=list(tokens), caches=caches, kv=kv, **options)

    # --- state ---------------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Positions the decoder's cache holds (every token of the session)."""
        return self._held(len(self.tokens))

    def _held(self, absorbed: int) -> int:
        """Positions the decoder's cache holds: its layers' count, or, for a cache of recurrent states
        only (mamba: its layers count none), ``absorbed``, the tokens the session fed it."""
        assert self.caches is not None
        counted = counted_positions(self.caches.cache)
        return absorbed if counted is None else counted

    @property
    def first_predicted(self) -> int | None:
        return min((s for s, _ in self.predicted), default=None)

    def predicted_positions(self) -> int:
        return sum(e - s for s, e in self.predicted)

    def verify(self) -> None:
        """Check the session's invariants (what a save writes and a load reads back): the decoder's
        cache holds every token, the auxiliary's at most that many, the predicted spans and the
        repair in progress lie within the tokens. A one-line :class:`KVPError` names what is wrong."""
        assert self.caches is not None
        n, held = len(self.tokens), self.offset
        if held != n:
            raise KVPError(f"the cache holds {held} positions but the session knows {n} tokens")
        draft = self.caches.draft_cache
        if draft is not None and held_positions(draft) > n:
            raise KVPError(f"the auxiliary's cache holds {held_positions(draft)} positions, more than the {n} tokens")
        if any(not 0 <= s < e <= n for s, e in self.predicted):
            raise KVPError(f"predicted positions {self.predicted} outside the {n} tokens")
        state = self._repair
        if state is not None:
            if not (self.predicted and state.start <= state.position <= n):
                raise KVPError(f"a repair from {state.start} at {state.position} does not fit the {n} tokens")
            if held_positions(state.cache) != state.position:
                raise KVPError(f"the repair's cache holds {held_positions(state.cache)} positions, "
                               f"its progress says {state.position}")

    def _mark(self, floor: int | None = None) -> _Mark:
        """What an operation writing positions ``floor`` and later (None: past every cache's end) may
        change, to put back with :meth:`_restore`. Cheap: offsets, or twins sharing the arrays."""
        assert self.caches is not None
        marks = []
        memory = self.kv.snapshot() if self.kv is not None else None
        if self.kv is None or not any(c is self.caches.cache for c in self.kv.caches):
            marks.append(CacheMark.of(self.caches.cache, floor))
        if self.caches.draft_cache is not None:
            marks.append(CacheMark.of(self.caches.draft_cache, floor))
        repair = self._repair
        return _Mark(list(self.tokens), list(self.predicted), len(self.turns), copy.copy(self.caches), repair,
                     repair.position if repair is not None else 0, marks, memory)

    def _restore(self, mark: _Mark) -> None:
        """The session as it was at ``mark``."""
        if mark.memory is not None:
            assert self.kv is not None
            self.kv.restore(mark.memory)
        for cache_mark in mark.cache_marks:
            cache_mark.restore()
        if mark.repair is not None:
            mark.repair.position = mark.repair_position
        del self.turns[mark.turns :]
        self.tokens, self.predicted, self.caches, self._repair = mark.tokens, mark.predicted, mark.caches, mark.repair

    def reset(self) -> None:
        """Forget the conversation (fresh caches)."""
        self.tokens, self.predicted, self.turns, self.caches, self._repair = [], [], [], None, None
        if self.kv is not None:
            self.kv.reset()
        self.__post_init__()

    def fork(self, upto: int | None = None) -> "Session":
        """A new session holding the first ``upto`` tokens (default: all) of this one, sharing nothing
        mutable with it (a trimmed copy needs trimmable caches); this session is unchanged."""
        if self.kv is not None:
            raise KVPError("a session with a KV budget cannot be forked (its episode caches are shared state)")
        n = len(self.tokens) if upto is None else upto
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(self.tokens):
            raise KVPError(f"can fork at 0 to {len(self.tokens)} tokens, got {upto!r}")
        assert self.caches is not None
        if n < len(self.tokens) and not can_trim_prompt_cache(self.caches.cache):
            raise KVPError(f"cannot fork at {n} of {len(self.tokens)} tokens: {untrimmable(self.caches.cache)}")
        cache = copy.deepcopy(self.caches.cache)
        if n < len(self.tokens):
            trim_prompt_cache(cache, held_positions(cache) - n)
        draft = self.caches.draft_cache
        draft = _trimmed_draft(copy.deepcopy(draft), n) if draft is not None else None
        return Session(self.model, method=self.method, max_kv_size=self.max_kv_size, system_prompt=self.system_prompt,
                       prefill_step_size=self.prefill_step_size, method_options=dict(self.method_options),
                       tokens=list(self.tokens[:n]), predicted=clip_spans(self.predicted, n),
                       caches=FilledCache(cache, self.caches.decoder, draft))

    # --- a turn --------------------------------------------------------------------------------

    def render(self, prompt: TurnInput, use_chat_template: bool | None = None,
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
            return list(tokenizer.encode(checked_text(prompt), add_special_tokens=first))
        return render_prompt(tokenizer, prompt, system_prompt=self.system_prompt if first else None,
                             use_chat_template=use_chat_template, chat_template_config=chat_template_config,
                             add_generation_prompt=add_generation_prompt)

    def stream_generate(self, prompt: TurnInput, **kwargs: Any) -> Iterator[GenerationResponse]:
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
        call, dec, _ = split_generation_kwargs(self.model, self.method, dict(kwargs, max_kv_size=self.max_kv_size),
                                               self.method_options, warm=True)
        if dec.draft is not None or dec.draft_model is not None:
            raise KVPError("speculative decoding is not available in sessions yet")
        ids = self.tokens + self.render(prompt, **render)
        warn_context(len(ids), self.model, strict)
        mark = self._mark(len(ids) - 1)
        recorded: list[int] = []
        last = None

        def record(steps: Iterator) -> Iterator:
            for step in steps:
                recorded.append(int(step[0]))
                yield step

        def end(stats: TurnStats) -> None:
            stats.generated_tokens = len(recorded)
            stats.ttft_s = last.ttft_s if last is not None else 0.0
            self._end_turn(prompt, ids + recorded, stats, recorded)

        try:
            # decoding feeds the last prompt token and every reply token into the cache
            stats = self._begin_turn(prompt, ids, len(ids) - 1, dec.max_tokens + 1)
            tic = time.perf_counter()
            assert self.caches is not None
            steps = token_stream(call, mx.array(ids, dtype=mx.int32), dec, warm=self.caches,
                                 on_fill=lambda filled: self._take_fill(filled, stats))
            for last in _responses(record(steps), self.model.tokenizer, stats.prefilled_tokens, dec.max_tokens, tic,
                                   call.name, self.caches.decoder):
                yield last
            end(stats)
        except GeneratorExit:  # the consumer stopped between tokens: the reply so far is kept
            self._atomic(mark, lambda: end(stats))
            raise
        except BaseException:
            self._restore(mark)
            raise

    def fill_for_decode(self, ids: list[int]) -> TurnStats:
        """A turn decoded elsewhere (a server's batch), its first half: ``ids`` (this session's
        tokens, then the new ones) filled by the session's method up to the last token, exactly as
        :meth:`stream_generate` fills before mlx-lm's loop runs that token. The session then holds
        ``ids[:-1]``; :meth:`end_decode` takes back the decoded cache. Atomic."""
        if self.kv is not None:
            raise KVPError("a session with a KV budget cannot decode outside its own turns")
        if len(ids) <= len(self.tokens) - 1 or ids[:len(self.tokens)] != self.tokens[:len(ids)]:
            raise KVPError("internal: the tokens to fill do not extend the session's")
        assert self._call is not None
        self._call.check_ids(ids)

        def turn() -> TurnStats:
            stats = self._begin_turn(ids[len(self.tokens):], ids, len(ids) - 1, 0)
            self._take_fill(self._fill(ids[:-1]), stats)
            self.tokens, self.predicted = list(ids[:-1]), clip_spans(self.predicted, len(ids) - 1)
            return stats

        return self._atomic(self._mark(len(ids) - 1), turn)

    def end_decode(self, ids: list[int], reply: Sequence[int], cache: list, stats: TurnStats) -> None:
        """A turn decoded elsewhere, its end: ``cache`` (the decoder's cache after the last prompt
        token ``ids[-1]`` and the ``reply`` tokens it was fed) becomes the session's cache; the history
        is what it holds, and the turn (``stats`` from :meth:`fill_for_decode`) is recorded."""
        assert self.caches is not None
        mx.eval([c.state for c in cache])  # an unevaluated copy would keep the whole batch's buffers alive
        self.caches = FilledCache(cache, self.caches.decoder, self.caches.draft_cache)
        stats.generated_tokens = len(reply)
        self._end_turn(ids[len(self.tokens):], list(ids) + list(reply), stats, reply)

    def generate(self, prompt: TurnInput, **kwargs: Any) -> str:
        return "".join(r.text for r in self.stream_generate(prompt, **kwargs))

    def prefill(self, prompt: TurnInput, use_chat_template: bool | None = None,
                progress: Callable[[int, int], None] | None = None) -> TurnStats:
        """Add a prompt to the caches without generating (``kvp-mlx cache-prompt``): the whole
        message is filled by the session's method. Through a chat template it is a complete user
        turn without the generation prompt (the next turn's message follows it). ``progress``: as
        the generation keyword ``prompt_progress_callback``."""
        ids = self.tokens + self.render(prompt, use_chat_template=use_chat_template, add_generation_prompt=False)

        def turn() -> TurnStats:
            stats = self._begin_turn(prompt, ids, len(ids), 0)
            self._take_fill(self._fill(ids, progress), stats)
            self._end_turn(prompt, ids, stats, None)
            return stats

        return self._atomic(self._mark(len(ids)), turn)

    def score(self, prompt: TurnInput, continuation: list[int]) -> mx.array:
        """Teacher forcing: add ``prompt`` as a turn (filled by the session's method) and feed the
        true ``continuation`` through the decoder as if it had been generated; returns the
        log-probabilities ``[len(continuation), vocab]`` the decoder gave each continuation token.
        The continuation stays in the history (the accuracy report's turns)."""
        if not continuation:
            raise KVPError("score needs a non-empty continuation")
        ids = self.tokens + self.render(prompt)

        assert self._call is not None
        self._call.check_ids(ids + list(continuation))  # the decoder reads the last ones unchecked

        def turn() -> mx.array:
            stats = self._begin_turn(prompt, ids, len(ids) - 1, len(continuation) + 1)
            filled = self._fill(ids[:-1])
            self._take_fill(filled, stats)
            fed = [ids[-1], *continuation]
            logits = filled.decoder(mx.array([fed], dtype=mx.int32), cache=filled.cache)[0, :-1].astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            mx.eval(logprobs)
            stats.generated_tokens = len(continuation)
            self._end_turn(prompt, ids + list(continuation), stats, continuation)
            return logprobs

        return self._atomic(self._mark(len(ids) - 1), turn)

    def _atomic(self, mark: _Mark, operation: Callable[[], Any]) -> Any:
        """``operation()``, or, if anything stops it, the session put back as it was at ``mark``."""
        try:
            return operation()
        except BaseException:
            self._restore(mark)
            raise

    def _begin_turn(self, prompt: TurnInput, ids: list[int], fill_to: int, reserve: int) -> TurnStats:
        """The start every turn shares: the bounded memory (if any) chooses the cache and makes room
        for ``ids[:fill_to]`` and ``reserve`` more positions; a cache holding more than ``fill_to``
        positions (a regenerated reply) is trimmed back. Returns the turn's statistics so far."""
        held = None
        if self.kv is not None:
            held = self.kv.before_turn(self.tokens, prompt, ids, fill_to, reserve)
            self.caches = FilledCache(self.kv.cache, self.model.base)
        assert self.caches is not None
        self.caches.positions = len(self.tokens)  # for a cache that counts no positions (the method's fill)
        if self.offset > fill_to:  # nothing new: run the last prompt token again
            self._trim_caches(self.offset - fill_to)
            if self._repair is not None and self._repair.position > fill_to:
                self._repair = None
        reused = self.offset if held is None else min(held, self.offset)
        return TurnStats(reused, len(ids) - reused, None)

    def _fill(self, ids: list[int], progress: Callable[[int, int], None] | None = None) -> FilledCache:
        assert self._call is not None and self.caches is not None
        return self._call.fill(mx.array([ids], dtype=mx.int32), self.prefill_step_size, self.max_kv_size,
                               warm=self.caches, progress=progress)

    def _take_fill(self, filled: FilledCache, stats: TurnStats) -> None:
        self.caches = filled
        stats.predicted = filled.predicted
        if filled.predicted is not None and filled.predicted[1] > filled.predicted[0]:
            self.predicted.append(filled.predicted)

    def _end_turn(self, prompt: TurnInput, tokens: list[int], stats: TurnStats, reply: Sequence[int] | None) -> None:
        """The end every turn shares (finished, stopped early or failed): the history is what the
        cache holds; the turn is recorded, and told to the bounded memory."""
        assert self.caches is not None
        held = self._held(len(tokens))  # mlx-lm's loop fed the cache every token it yielded
        if held > len(tokens):
            raise KVPError(f"internal: the cache holds {held} positions but the session knows {len(tokens)} tokens")
        self._trim_draft(held)  # a reply stopped early: the auxiliary may hold more
        if self.kv is not None:
            self.kv.after_turn(prompt, reply)
        self.turns.append(stats)  # the caller's mark drops it again if what follows is interrupted
        self.tokens, self.predicted = list(tokens[:held]), clip_spans(self.predicted, held)

    def compress(self, should_stop: Callable[[], bool] | None = None) -> Any:
        """A KV-budget session's work between turns (the memory's ``compress``: for
        :class:`~kvp_mlx.epicache.memory.BoundedMemory`, evict back to the budget, bring other
        episodes' caches up to date); stops between caches when ``should_stop()`` (the next turn
        does what is left, or the next call)."""
        if self.kv is None:
            raise KVPError("this session has no KV budget: nothing to compress")
        kv = self.kv

        def compress() -> Any:
            report = kv.compress(self.tokens, should_stop)
            self.caches = FilledCache(kv.cache, self.model.base)
            return report

        return self._atomic(self._mark(), compress)

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
            n = len(chunk)
            try:
                base(mx.array([chunk], dtype=mx.int32), cache=state.cache)
                mx.eval([c.state for c in state.cache])
            except BaseException:  # the chunk is undone: the repair resumes at state.position
                self._abandon_chunk(state)
                raise
            state.position += n
            done += n
        assert self.caches is not None
        repaired = FilledCache(state.cache, base, self.caches.draft_cache)
        self.caches, self.predicted, self._repair = repaired, [], None  # one step: no signal lands between
        return RepairReport(state.start, state.position, done, time.perf_counter() - tic, True)

    def _abandon_chunk(self, state: _RepairState) -> None:
        """The repair's cache back to its progress (the live caches are untouched), or, where it
        cannot be trimmed, the repair dropped (the next one starts over). An interrupt can land
        between two layers of the chunk's forward pass, so each layer is trimmed by what it holds."""
        layers = [c for c in state.cache if getattr(c, "offset", None) is not None]
        if not any(c.offset > state.position for c in layers):
            return
        if can_trim_prompt_cache(state.cache):
            for c in layers:
                if c.offset > state.position:
                    c.trim(c.offset - state.position)
        else:
            self._repair = None

    def _start_repair(self, start: int) -> _RepairState:
        """An exact copy of the cache up to ``start`` (plain KVCache layers), or a fresh cache."""
        assert self.caches is not None
        live = self.caches.cache
        if all(type(c) is KVCache for c in live):
            cache = []
            for c in live:
                copy_ = KVCache()
                copy_.state = (c.keys[..., :start, :], c.values[..., :start, :], start)
                cache.append(copy_)
            return _RepairState(cache, start, start)
        # sliding-window or quantized layers: no exact prefix to keep; recompute from position 0
        return _RepairState(make_prompt_cache(self.model.base, self.max_kv_size), start, 0)

    def trim(self, n: int) -> None:
        """Drop the last ``n`` tokens (regenerate or edit a turn), where the caches allow it."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(self.tokens):
            raise KVPError(f"can trim 0 to {len(self.tokens)} tokens, got {n!r}")
        keep = len(self.tokens) - n

        def trim() -> None:
            self._trim_caches(n)
            repair = None if self._repair is not None and self._repair.position > keep else self._repair
            self.tokens, self.predicted, self._repair = self.tokens[:keep], clip_spans(self.predicted, keep), repair

        self._atomic(self._mark(keep), trim)

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
            raise KVPError(f"cannot drop {n} positions: {untrimmable(self.caches.cache)}; reset the session")
        trim_prompt_cache(self.caches.cache, n)
        self._trim_draft(self.offset)

    def _trim_draft(self, keep: int) -> None:
        """The auxiliary's cache cut to ``keep`` positions (dropped when it cannot be trimmed: the
        next kvp turn rebuilds it from position 0)."""
        assert self.caches is not None
        if self.caches.draft_cache is not None:
            self.caches.draft_cache = _trimmed_draft(self.caches.draft_cache, keep)


def untrimmable(cache: list) -> str:
    """Why mlx-lm cannot trim ``cache`` (a hybrid's or state-space model's recurrent states, or
    sliding-window / rotating layers), for a one-line error."""
    recurrent = sorted({type(c).__name__ for c in cache if not hasattr(c, "offset") and not c.is_trimmable()})
    if recurrent:
        return (f"this session's cache holds recurrent states ({', '.join(recurrent)}), which cannot be "
                "trimmed back to an earlier token")
    return "this session's cache cannot be trimmed (sliding-window or rotating layers)"


def _trimmed_draft(cache: list, keep: int) -> list | None:
    """``cache`` holding at most ``keep`` positions, trimmed in place; None when it cannot be trimmed."""
    held = held_positions(cache)
    if held <= keep:
        return cache
    if not can_trim_prompt_cache(cache):
        return None
    trim_prompt_cache(cache, held - keep)
    return cache
