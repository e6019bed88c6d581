"""Continuous batching for the worker (``kvp-mlx serve --decode-concurrency N``, N > 1).

Each new request is filled through its session, as a turn fills before mlx-lm's loop runs the last
prompt token (``Session.fill_for_decode``: ``kvp`` predicts the uncached suffix, ``base`` prefills
it); its filled cache and last prompt token go into mlx-lm's :class:`BatchGenerator`, which decodes
every active sequence together (its own sampler and logits processors each, as mlx-lm's server
passes them). A finished sequence's cache goes back into its session (``Session.end_decode``) and
the session into the prefix cache, as after a turn served alone. A request whose client went away
is removed from the batch at the next step.

Requests that cannot join a batch are served alone, in arrival order, once the batch has drained
(the worker's one-at-a-time path): ``/v1/completions`` with several prompts, ``n`` > 1, ``echo`` or
``logprobs`` as an integer; methods other than ``kvp`` and ``base``; a seeded request that samples
(one random stream serves the whole batch); models whose caches mlx-lm cannot merge (anything but
plain ``KVCache`` layers: hybrid, recurrent, sliding-window). Idle repair runs only while nothing
decodes.
"""

from __future__ import annotations

import logging
import queue
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, TextStateMachine
from mlx_lm.models.cache import KVCache, make_prompt_cache

from kvp_mlx.conversation.session import Session, TurnStats
from kvp_mlx.errors import KVPError
from kvp_mlx.mlx_lm_private import format_top_logprobs
from kvp_mlx.model import KVPModel
from kvp_mlx.sampling import SamplingOptions
from kvp_mlx.server.textout import StopText, ToolText

log = logging.getLogger("kvp_mlx.server")

BATCH_METHODS = ("kvp", "base")


def batching_possible(model: KVPModel) -> bool:
    """Whether mlx-lm's batch can merge this model's caches (plain ``KVCache`` layers only)."""
    return all(type(c) is KVCache for c in make_prompt_cache(model.base))


@dataclass
class _Sequence:
    """A request decoding in the batch."""

    job: Any  # kvp_mlx.server.worker.Job (the worker imports this module)
    session: Session
    prompt: list[int]
    stats: TurnStats
    reused: int
    tic: float
    detokenizer: Any
    state: Any  # mlx-lm's text state machine
    stop: Any  # StopText
    tools: Any  # ToolText
    reply: list[int] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    ttft: float | None = None


class BatchDecoder:
    """The worker's loop when batching: admits requests into one mlx-lm ``BatchGenerator``."""

    def __init__(self, worker: Any) -> None:  # kvp_mlx.server.worker.Worker
        self.worker = worker
        self.model = worker.model
        tokenizer = self.model.tokenizer
        self.eos = set(tokenizer.eos_token_ids)
        self.generator: BatchGenerator | None = None
        self.active: dict[int, _Sequence] = {}
        self.waiting: Any = None  # a Job: a request to serve alone once the batch has drained
        self.stopping = False

    def _make_generator(self) -> BatchGenerator:
        w = self.worker
        return BatchGenerator(self.model.base, stop_tokens=[[t] for t in sorted(self.eos)],
                              completion_batch_size=w.decode_concurrency,
                              prefill_batch_size=w.decode_concurrency, prefill_step_size=w.prefill_step_size)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        w = self.worker
        while True:
            if not self.stopping and self.waiting is None:
                self._admit()
            if self.active:
                self._step()
                continue
            if self.waiting is not None:  # the batch has drained: this one alone
                job, self.waiting = self.waiting, None
                w._serve_guarded(job)
                continue
            if self.stopping:  # the worker waits for the queued MLX work
                self.generator = None
                return
            if w._has_repair_work() and w.queue.empty():
                w._repair_step()  # between batches only; it stops when a request arrives
            elif w.queue.empty() and not w._has_repair_work():
                w.idle.set()

    def _next_job(self, block: bool) -> Any:
        w = self.worker
        try:
            job = w.queue.get() if block else w.queue.get_nowait()
        except queue.Empty:
            return None
        if job is None:
            self.stopping = True
        return job

    def _admit(self) -> None:
        """Take queued requests into the batch (at most ``prompt_concurrency`` this step), until one
        that must be served alone (it waits for the batch to drain)."""
        w = self.worker
        admitted = 0
        while admitted < w.prompt_concurrency and len(self.active) < w.decode_concurrency:
            block = not self.active and not w._has_repair_work() and admitted == 0
            if block and w.queue.empty():
                w.idle.set()  # nothing queued, decoding or left to repair
            job = self._next_job(block)
            if job is None:
                return
            if not self.batchable(job):
                self.waiting = job
                return
            admitted += 1
            try:
                self._insert(job)
            except BaseException as e:  # never let one request kill the worker
                w.fail(job, e)
                w.keep(job)

    def batchable(self, job: Any) -> bool:
        req = job.request
        if req.method not in BATCH_METHODS or req.max_tokens < 1 or len(req.prompt) < 1:
            return False
        if req.kind == "text" and (req.n != 1 or len(req.prompts) > 1 or req.echo or req.logprobs_k is not None):
            return False
        if req.seed is not None and not SamplingOptions(**req.sampling).greedy:
            return False
        return True

    # --- a request joins -----------------------------------------------------------------------

    def _insert(self, job: Any) -> None:
        w = self.worker
        job.started = time.perf_counter()
        if job.cancelled.is_set():
            w.stats.cancelled += 1
            w.keep(job)
            return
        req = job.request
        if w._text_sm is None:
            from mlx_lm.generate import make_text_state_machine

            w._text_sm = make_text_state_machine(self.model.tokenizer, [])
        prompt = w.cache.align(req.method, req.prompt) if req.kind != "text" else list(req.prompt)
        session, reused = w.cache.fetch(req.method, prompt)
        if session is None:
            session = Session(self.model, method=req.method, prefill_step_size=w.prefill_step_size)
        job.events.put(("start", {"cached_tokens": reused} if req.kind != "text" else {}))
        tic = time.perf_counter()
        try:
            stats = session.fill_for_decode(prompt)
        except KVPError as e:
            job.events.put(("error", 400, str(e)))
            w.keep(job)
            return
        assert session.caches is not None
        if session.caches.decoder is not self.model.base:
            raise KVPError(f"internal: method '{req.method}' decodes with another model than the base")
        options = SamplingOptions(**req.sampling)
        tokenizer = self.model.tokenizer
        sampler = None if options.greedy else options.sampler(tokenizer.encode("\n") + list(tokenizer.eos_token_ids))
        # a seed: greedy here (a seeded request that samples is served alone), so nothing to seed
        if self.generator is None:
            self.generator = self._make_generator()
        (uid,) = self.generator.insert([[prompt[-1]]], max_tokens=[req.max_tokens], caches=[session.caches.cache],
                                       all_tokens=[list(prompt[:-1])], samplers=[sampler],  # type: ignore[list-item]  # None: the batch's greedy sampler
                                       logits_processors=[options.logits_processors()])
        assert w._text_sm is not None
        self.active[uid] = _Sequence(job, session, prompt, stats, reused, tic, tokenizer.detokenizer,
                                     w._text_sm.make_state("normal"), StopText(req.stop_words),
                                     ToolText(req.parse_tools))

    # --- one decoding step ---------------------------------------------------------------------

    def _step(self) -> None:
        w = self.worker
        assert self.generator is not None
        for uid, seq in list(self.active.items()):
            if seq.job.cancelled.is_set():
                w.stats.cancelled += 1
                self._end(uid, "cancelled", self._removed(uid))
        if not self.active:
            return
        w.stats.widest_batch = max(w.stats.widest_batch, len(self.active))
        try:
            _, responses = self.generator.next()
        except BaseException as e:  # the whole batch fails; the worker goes on with a fresh one
            log.error("batch failed: %s\n%s", e, traceback.format_exc())
            for seq in list(self.active.values()):
                w.stats.failed += 1
                seq.job.events.put(("error", 500, f"internal error: {type(e).__name__}: {e}"))
                w.keep(seq.job)
            self.active.clear()
            self.generator = None
            return
        for r in responses:
            found = self.active.get(r.uid)
            if found is None:
                continue
            reason = self._token(found, int(r.token), r.logprobs, r.finish_reason)
            if reason is not None:
                cache = r.prompt_cache if r.finish_reason is not None else self._removed(r.uid)
                self._end(r.uid, reason, cache)
        if not self.active:
            mx.clear_cache()  # the batch drained: its buffers go back

    def _removed(self, uid: int) -> list | None:
        """Take a sequence out of the batch; its cache (prompt and the reply so far)."""
        assert self.generator is not None
        got = self.generator.remove([uid], return_prompt_caches=True)
        return got[uid][0] if uid in got else None

    def _token(self, seq: _Sequence, token: int, logprobs: mx.array, finish: str | None) -> str | None:
        """One decoded token out as a ``token`` event (text as :func:`kvp_mlx.generation._responses`
        makes it, then the worker's tool-call and stop-string handling); the finish reason, if it ends."""
        job, req = seq.job, seq.job.request
        job.generated += 1
        seq.reply.append(token)
        if seq.ttft is None:
            seq.ttft = time.perf_counter() - seq.tic
        if token not in self.eos:
            seq.detokenizer.add_token(token)
        if finish is not None:
            seq.detokenizer.finalize()
        seq.state, segments = TextStateMachine.split(seq.state, seq.detokenizer.last_segment)
        reason = finish
        if reason is not None:
            seq.state, flushed, state = TextStateMachine.flush(seq.state)
            segments.append((state, flushed))
        text, calls, reasoning = seq.tools.feed(segments, final=reason is not None)
        text, stopped = seq.stop.feed(text)
        if stopped:
            reason = "stop"
        elif reason is not None:
            text += seq.stop.flush()
        seq.sent.append(text)
        piece: dict[str, Any] = {"text": text, "token": token, "index": 0}
        if calls:
            piece["tool_calls"] = calls
        if reasoning:
            piece["reasoning"] = reasoning
        if req.logprobs or req.top_logprobs:
            piece["logprob"] = float(logprobs[token].item())  # type: ignore[arg-type]
            piece["top"] = format_top_logprobs(logprobs, req.top_logprobs, self.model.tokenizer)
        job.events.put(("token", piece))
        return reason

    def _end(self, uid: int, finish: str, cache: list | None) -> None:
        """A sequence is done: its session takes the decoded cache and goes back to the prefix cache."""
        w = self.worker
        seq = self.active.pop(uid)
        job, req, session, stats = seq.job, seq.job.request, seq.session, seq.stats
        try:
            if cache is not None:
                session.end_decode(seq.prompt, seq.reply, cache, stats)
                w.cache.insert(session, (len(seq.prompt), "".join(seq.sent)) if req.kind != "text" else None)
            w.stats.served += 1
            turn = session.turns[-1] if session.turns else stats
            prefill = {"method": req.method, "ttft_s": seq.ttft, "prefilled_tokens": turn.prefilled_tokens,
                       "predicted_tokens": (turn.predicted[1] - turn.predicted[0]) if turn.predicted else 0}
            if req.kind == "text":
                job.events.put(("choice", {"index": 0, "finish_reason": finish}))
                job.events.put(("done", {
                    "finish_reason": None, "prompt_tokens": len(seq.prompt), "completion_tokens": job.generated,
                    "cached_tokens": turn.reused_tokens, "prefill": prefill}))
            else:
                job.events.put(("done", {
                    "finish_reason": finish, "prompt_tokens": len(seq.prompt), "completion_tokens": job.generated,
                    "cached_tokens": turn.reused_tokens, "prefill": prefill}))
        except BaseException as e:
            w.fail(job, e)
        finally:
            w.keep(job)
