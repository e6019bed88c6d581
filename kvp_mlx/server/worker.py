"""The model worker: one thread runs every MLX operation, serving a request queue in order.

Requests are served one at a time, first come first served, unless ``decode_concurrency`` > 1:
then :mod:`kvp_mlx.server.batching` decodes the requests that can batch together (mlx-lm's
``BatchGenerator``) and serves the others alone, in order, between batches. For each, the session
cache hands over (or copies) the session sharing the longest prefix with the request's tokens, the
session's method prefills only the rest (``kvp``: KV Prediction of the uncached suffix), mlx-lm's
loop decodes, and the session, now holding prompt and reply, goes back to the cache. While the
queue is empty the worker repairs the most recently used sessions' predicted positions, one chunk
at a time, stopping as soon as a request arrives (``Session.repair(should_stop=...)``).

The HTTP threads only see :class:`Job` events: ``("start", info)``, ``("token", piece)``,
``("done", summary)``, ``("error", status, message)``; ``/v1/completions`` also gets
``("echo", prompt)`` (a prompt and its tokens' log-probabilities, for ``echo``) and ``("choice", end)``
after each choice (a piece's ``index`` names its choice). A job whose client went away is marked
``cancelled``; the worker stops its generation at the next token (or skips it if not started).

Completions (``_serve_text``): several prompts are served one after the other; ``n`` choices of one
prompt share one prefill (the session filled up to the last prompt token is forked per choice, and
each choice samples on its own, with ``seed + i``). ``echo``'s log-probabilities of the prompt tokens
come from a forward pass of the base model over the prompt (exact K/V, whatever the method); for
method ``base`` that pass's cache is the session the choices decode from (no second prefill).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx_lm.generate import TextStateMachine, make_text_state_machine
from mlx_lm.models.cache import make_prompt_cache
from kvp_mlx.mlx_lm_private import format_top_logprobs

from kvp_mlx.errors import KVPError
from kvp_mlx.model import KVPModel
from kvp_mlx.progress import PrefillLog
from kvp_mlx.server.prompt_cache import SessionCache
from kvp_mlx.server.protocol import GenerationRequest
from kvp_mlx.server.textout import StopText, ToolText
from kvp_mlx.conversation.session import Session

if TYPE_CHECKING:
    from kvp_mlx.server.batching import BatchDecoder

__all__ = ["Job", "StopText", "ToolText", "Worker", "WorkerStats"]
log = logging.getLogger("kvp_mlx.server")


@dataclass
class Job:
    request: GenerationRequest
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    generated: int = 0  # tokens decoded for this job (measured by the disconnect test)


@dataclass
class WorkerStats:
    served: int = 0
    failed: int = 0
    cancelled: int = 0  # jobs stopped or skipped because their client went away
    repaired_positions: int = 0
    repairs_interrupted: int = 0  # repairs stopped between chunks because a request came
    repair_boundaries: list[float] = field(default_factory=list)  # times the repair checked for requests
    jobs: list[Job] = field(default_factory=list)  # the last few finished jobs (tests, benchmarks)
    widest_batch: int = 0  # most sequences decoded together in one step (--decode-concurrency)


class Worker:
    """Owns the model, the session cache and the queue; ``start()`` runs it in a daemon thread."""

    def __init__(self, model: KVPModel, cache: SessionCache, *, repair: bool = True,
                 prefill_step_size: int = 2048, repair_step_size: int = 256, keep_jobs: int = 256,
                 decode_concurrency: int = 1, prompt_concurrency: int = 1) -> None:
        self.model, self.cache, self.repair = model, cache, repair
        self.decode_concurrency, self.prompt_concurrency = decode_concurrency, prompt_concurrency
        self._batch: BatchDecoder | None = None
        self.prefill_step_size, self.repair_step_size = prefill_step_size, repair_step_size
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.stats = WorkerStats()
        self.keep_jobs = keep_jobs
        self.idle = threading.Event()  # set while nothing is queued, running or left to repair
        self.idle.set()
        self._thread = threading.Thread(target=self._run, name="kvp-mlx-worker", daemon=True)
        self._text_sm: TextStateMachine | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request)
        self.idle.clear()
        self.queue.put(job)
        return job

    def stop(self, timeout: float = 30.0) -> None:
        self.queue.put(None)
        self._thread.join(timeout)

    # --- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        from kvp_mlx.server.batching import BatchDecoder, batching_possible  # it imports this module

        if self.decode_concurrency > 1 and batching_possible(self.model):
            self._batch = BatchDecoder(self)
            self._batch.run()
            _finish_queued_work()
            return
        while True:
            try:
                job = self.queue.get_nowait() if self._has_repair_work() else self.queue.get()
            except queue.Empty:
                self._repair_step()
                continue
            if job is None:
                _finish_queued_work()
                return
            self._serve_guarded(job)
            if self.queue.empty() and not self._has_repair_work():
                self.idle.set()

    def _serve_guarded(self, job: Job) -> None:
        try:
            self._serve(job)
        except BaseException as e:  # never let one request kill the worker
            self.fail(job, e)
        finally:
            self.keep(job)

    def fail(self, job: Job, error: BaseException) -> None:
        """A request that raised: logged, counted, and answered with a 500 (the worker goes on)."""
        self.stats.failed += 1
        log.error("request failed: %s\n%s", error, traceback.format_exc())
        job.events.put(("error", 500, f"internal error: {type(error).__name__}: {error}"))

    def keep(self, job: Job) -> None:
        self.stats.jobs.append(job)
        del self.stats.jobs[: -self.keep_jobs]

    def _has_repair_work(self) -> bool:
        return self.repair and any(s.predicted for s in self.cache.most_recent_first())

    def _repair_step(self) -> None:
        """Repair the most recently used session with predicted positions, until a request comes."""
        def should_stop() -> bool:
            self.stats.repair_boundaries.append(time.perf_counter())
            del self.stats.repair_boundaries[:-4096]
            return not self.queue.empty()

        for session in self.cache.most_recent_first():
            if not session.predicted:
                continue
            report = session.repair(should_stop=should_stop, prefill_step_size=self.repair_step_size)
            self.stats.repaired_positions += report.positions
            if report.complete:
                self.cache.refresh(session)
                mx.clear_cache()
            else:
                self.stats.repairs_interrupted += 1
            break
        if self.queue.empty() and not self._has_repair_work():
            self.idle.set()

    # --- one request ---------------------------------------------------------------------------

    def _serve(self, job: Job) -> None:
        job.started = time.perf_counter()
        if job.cancelled.is_set():
            self.stats.cancelled += 1
            return
        req = job.request
        if self._text_sm is None:  # mlx-lm's reasoning and tool-call markers, stripped from the text
            self._text_sm = make_text_state_machine(self.model.tokenizer, [])
        if req.kind == "text":
            self._serve_text(job)
            return
        prompt = self.cache.align(req.method, req.prompt)  # resent replies as the ids that produced them
        session, reused = self.cache.fetch(req.method, prompt)
        if session is None:
            session = Session(self.model, method=req.method, prefill_step_size=self.prefill_step_size)
        suffix = prompt[len(session.tokens):]
        job.events.put(("start", {"cached_tokens": reused}))
        sent: list[str] = []
        finish, last, ok = self._decode(job, session, suffix, req.seed, sent=sent)
        turn = session.turns[-1] if session.turns else None
        if ok:
            self.cache.insert(session, (len(prompt), "".join(sent)))  # a failed turn's session is dropped
            self.stats.served += 1
            job.events.put(("done", {
                "finish_reason": finish, "prompt_tokens": len(prompt),
                "completion_tokens": job.generated,
                "cached_tokens": turn.reused_tokens if turn is not None else reused,
                "prefill": {"method": req.method, "ttft_s": last.ttft_s if last is not None else None,
                            "prefilled_tokens": turn.prefilled_tokens if turn is not None else None,
                            "predicted_tokens": (turn.predicted[1] - turn.predicted[0])
                            if turn is not None and turn.predicted else 0},
            }))

    def _decode(self, job: Job, session: Session, suffix: list[int], seed: int | None,
                index: int = 0, sent: list[str] | None = None) -> tuple[str, Any, bool]:
        """One choice: ``session`` takes ``suffix`` (the prompt tokens it lacks) and decodes; each
        token goes out as a ``token`` event, its text also appended to ``sent``. (finish reason, the
        last response, whether it ended without an error; an error has gone out as an ``error`` event)."""
        req = job.request
        tokenizer = self.model.tokenizer
        assert self._text_sm is not None
        sm = self._text_sm.make_state("normal")
        stop = StopText(req.stop_words)
        tools = ToolText(req.parse_tools)
        kwargs: dict[str, Any] = dict(req.sampling, max_tokens=req.max_tokens, seed=seed,
                                      prompt_progress_callback=PrefillLog(log))  # INFO lines for a long prefill
        finish, last = "length", None
        ok = False
        steps = session.stream_generate(suffix, **kwargs)
        try:
            for last in steps:
                job.generated += 1
                reason = last.finish_reason
                sm, segments = TextStateMachine.split(sm, last.text)
                if reason is not None:  # the end: nothing is held back any more
                    sm, flushed, state = TextStateMachine.flush(sm)
                    segments.append((state, flushed))
                text, calls, reasoning = tools.feed(segments, final=reason is not None)
                text, stopped = stop.feed(text)
                if stopped:
                    reason = "stop"
                elif reason is not None:
                    text += stop.flush()
                if sent is not None:
                    sent.append(text)
                piece: dict[str, Any] = {"text": text, "token": int(last.token), "index": index}
                if calls:
                    piece["tool_calls"] = calls
                if reasoning:
                    piece["reasoning"] = reasoning
                if req.logprobs_k is not None:  # OpenAI's completions format
                    piece["logprob"] = float(last.logprobs[last.token].item())  # type: ignore[arg-type]
                    piece["token_text"] = self._token_text(int(last.token))
                    piece["top_map"] = self._top_map(last.logprobs[None], req.logprobs_k)[0]
                elif req.logprobs or req.top_logprobs:
                    piece["logprob"] = float(last.logprobs[last.token].item())  # type: ignore[arg-type]
                    piece["top"] = format_top_logprobs(last.logprobs, req.top_logprobs, tokenizer)
                job.events.put(("token", piece))
                if reason is not None:
                    finish = reason
                    break
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                    finish = "cancelled"
                    break
            ok = True
        except KVPError as e:
            job.events.put(("error", 400, str(e)))
        finally:
            steps.close()  # type: ignore[attr-defined]  # a generator; the session settles: its history is what its cache holds
        return finish, last, ok

    # --- /v1/completions ------------------------------------------------------------------------

    def _serve_text(self, job: Job) -> None:
        """Every prompt of a completions request, ``n`` choices each (indices prompt * n + choice)."""
        req = job.request
        prompts = req.prompts or [req.prompt]
        texts = req.prompt_texts or [None] * len(prompts)
        job.events.put(("start", {}))
        totals = {"prompt_tokens": 0, "cached_tokens": 0, "prefilled_tokens": 0, "predicted_tokens": 0}
        ttft: float | None = None
        for p, (prompt, text) in enumerate(zip(prompts, texts)):
            totals["prompt_tokens"] += len(prompt)
            echo_cache = None
            if req.echo:
                echo, echo_cache = self._echo(prompt, text, req.logprobs_k)
                job.events.put(("echo", {"prompt": p, **echo}))
            if req.max_tokens == 0:  # the echo alone
                totals["prefilled_tokens"] += max(len(prompt) - 1, 0)
                for i in range(req.n):
                    job.events.put(("choice", {"index": p * req.n + i, "finish_reason": "length"}))
                continue
            try:
                session, reused, prefilled, predicted = self._filled_session(req, prompt, echo_cache)
            except KVPError as e:
                job.events.put(("error", 400, str(e)))
                return
            for i in range(req.n):
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                    return
                if req.n == 1:  # the session takes the whole rest of the prompt
                    choice, suffix = session, prompt[len(session.tokens):]
                else:  # each choice from a copy of the session filled to the last prompt token
                    last_one = i == req.n - 1 and len(session.tokens) == len(prompt) - 1
                    choice = session if last_one else session.fork(len(prompt) - 1)
                    suffix = prompt[len(prompt) - 1:]
                seed = None if req.seed is None else (req.seed + i) % 2**64
                finish, last, ok = self._decode(job, choice, suffix, seed, p * req.n + i)
                if not ok:
                    return
                if i == 0:
                    if prefilled is None:  # the prefill happened in this turn
                        turn = choice.turns[-1]
                        reused, prefilled = turn.reused_tokens, turn.prefilled_tokens
                        predicted = turn.predicted[1] - turn.predicted[0] if turn.predicted else 0
                    if ttft is None and last is not None:
                        ttft = last.ttft_s
                if i == req.n - 1:
                    self.cache.insert(choice)
                job.events.put(("choice", {"index": p * req.n + i, "finish_reason": finish}))
                if finish == "cancelled":
                    return
            totals["cached_tokens"] += reused
            totals["prefilled_tokens"] += prefilled or 0
            totals["predicted_tokens"] += predicted
        self.stats.served += 1
        job.events.put(("done", {
            "finish_reason": None, "prompt_tokens": totals["prompt_tokens"], "completion_tokens": job.generated,
            "cached_tokens": totals["cached_tokens"],
            "prefill": {"method": req.method, "ttft_s": ttft, "prefilled_tokens": totals["prefilled_tokens"],
                        "predicted_tokens": totals["predicted_tokens"]},
        }))

    def _filled_session(self, req: GenerationRequest, prompt: list[int],
                        echo_cache: list | None) -> tuple[Session, int, int | None, int]:
        """The session a prompt's choices decode from, and (cached, prefilled, predicted) tokens so
        far. For one choice it may still lack any part of the prompt (its turn prefills it: prefilled
        None); for several it holds at least all the prompt tokens but the last, the prefill shared."""
        if echo_cache is not None and req.method == "base":  # the echo pass filled the base cache
            session = Session.resume(self.model, prompt[:-1], cache=echo_cache,
                                     prefill_step_size=self.prefill_step_size)
            return session, 0, len(prompt) - 1, 0
        fetched, reused = self.cache.fetch(req.method, prompt)
        session = fetched or Session(self.model, method=req.method, prefill_step_size=self.prefill_step_size)
        if req.n == 1:
            return session, reused, None, 0
        if len(session.tokens) >= len(prompt) - 1:
            return session, reused, 0, 0
        stats = session.prefill(prompt[len(session.tokens):len(prompt) - 1])
        predicted = stats.predicted[1] - stats.predicted[0] if stats.predicted else 0
        return session, stats.reused_tokens, stats.prefilled_tokens, predicted

    def _echo(self, prompt: list[int], text: str | None, k: int | None) -> tuple[dict, list]:
        """The prompt's tokens with their log-probabilities under the base model on exact K/V (a
        forward pass over all but the last token; the first token has none) and the top ``k`` at
        each; and the base cache that pass filled (holding all the prompt tokens but the last)."""
        lm = self.model.base
        cache = make_prompt_cache(lm)
        logprobs: list[float | None] = [None]
        tops: list[dict[str, float] | None] = [None]
        ids = mx.array([prompt], dtype=mx.int32)
        for start in range(0, len(prompt) - 1, self.prefill_step_size):
            end = min(start + self.prefill_step_size, len(prompt) - 1)
            logits = lm(ids[:, start:end], cache=cache)[0].astype(mx.float32)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            chosen = mx.take_along_axis(lp, ids[0, start + 1:end + 1, None], axis=-1)[:, 0]
            mx.eval(chosen, [c.state for c in cache])
            logprobs += chosen.tolist()  # type: ignore[arg-type]
            tops += self._top_map(lp, k or 0)
            mx.clear_cache()
        tokenizer = self.model.tokenizer
        detok = tokenizer.detokenizer
        detok.reset()
        offsets, at = [], 0
        for t in prompt:
            offsets.append(at)
            detok.add_token(t)
            at += len(detok.last_segment)
        echo_text = text if text is not None else tokenizer.decode(prompt)
        return {"text": echo_text, "token_ids": list(prompt), "tokens": [self._token_text(t) for t in prompt],
                "logprobs": logprobs, "top": tops if k is not None else None, "offsets": offsets}, cache

    def _top_map(self, lp: mx.array, k: int) -> list[dict[str, float]]:
        """Per row of log-probabilities [T, vocab]: the ``k`` most likely tokens' texts and values."""
        if k <= 0:
            return [{} for _ in range(lp.shape[0])]
        idx = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
        vals = mx.take_along_axis(lp, idx, axis=-1)
        mx.eval(idx, vals)
        rows = []
        all_ids: list[list[int]] = idx.tolist()  # type: ignore[assignment]  # a [T, k] array
        all_values: list[list[float]] = vals.tolist()  # type: ignore[assignment]
        for ids, values in zip(all_ids, all_values):
            row: dict[str, float] = {}
            for v, i in sorted(zip(values, ids), reverse=True):  # most likely first; a text keeps its best
                row.setdefault(self._token_text(i), v)
            rows.append(row)
        return rows

    def _token_text(self, token: int) -> str:
        return str(self.model.tokenizer.decode([token]))


def _finish_queued_work() -> None:
    """Wait for this thread's queued MLX work (mlx-lm evaluates one token ahead) before it ends: an
    op still inside a threaded BLAS call at process exit can hang OpenBLAS's shutdown (kvp_mlx._blas)."""
    from mlx_lm.generate import generation_stream

    for stream in (mx.cpu, generation_stream):
        mx.synchronize(stream)
