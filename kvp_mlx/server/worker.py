"""The model worker: one thread runs every MLX operation, serving a request queue in order.

Requests are served one at a time, first come first served (no batching). For each, the session
cache hands over (or copies) the session sharing the longest prefix with the request's tokens, the
session's method prefills only the rest (``kvp``: KV Prediction of the uncached suffix), mlx-lm's
loop decodes, and the session, now holding prompt and reply, goes back to the cache. While the
queue is empty the worker repairs the most recently used sessions' predicted positions, one chunk
at a time, stopping as soon as a request arrives (``Session.repair(should_stop=...)``).

The HTTP threads only see :class:`Job` events: ``("start", info)``, ``("token", piece)``,
``("done", summary)``, ``("error", status, message)``. A job whose client went away is marked
``cancelled``; the worker stops its generation at the next token (or skips it if not started).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import TextStateMachine, make_text_state_machine
from kvp_mlx.mlx_lm_private import format_top_logprobs

from kvp_mlx.errors import KVPError
from kvp_mlx.model import KVPModel
from kvp_mlx.progress import PrefillLog
from kvp_mlx.server.prompt_cache import SessionCache
from kvp_mlx.server.protocol import GenerationRequest
from kvp_mlx.conversation.session import Session

log = logging.getLogger("kvp_mlx.server")


class StopText:
    """Stop strings matched on the decoded text (mlx-lm matches their token ids, which miss a stop
    string tokenized differently inside the text, and strips them from the text instead): generation
    stops where the first one occurs, the text before it kept, the stop string dropped. Text that may
    begin a stop string is held back until the next piece decides."""

    def __init__(self, words: list[str]) -> None:
        self.words, self.pending = words, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that can be emitted, whether a stop string ended the generation)."""
        buf = self.pending + text
        found = [i for i in (buf.find(w) for w in self.words) if i >= 0]
        if found:
            self.pending = ""
            return buf[:min(found)], True
        hold = max((k for w in self.words for k in range(1, len(w)) if buf.endswith(w[:k])), default=0)
        self.pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


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


class Worker:
    """Owns the model, the session cache and the queue; ``start()`` runs it in a daemon thread."""

    def __init__(self, model: KVPModel, cache: SessionCache, *, repair: bool = True,
                 prefill_step_size: int = 2048, repair_step_size: int = 256, keep_jobs: int = 256) -> None:
        self.model, self.cache, self.repair = model, cache, repair
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
        while True:
            try:
                job = self.queue.get_nowait() if self._has_repair_work() else self.queue.get()
            except queue.Empty:
                self._repair_step()
                continue
            if job is None:
                _finish_queued_work()
                return
            try:
                self._serve(job)
            except BaseException as e:  # never let one request kill the worker
                self.stats.failed += 1
                log.error("request failed: %s\n%s", e, traceback.format_exc())
                job.events.put(("error", 500, f"internal error: {type(e).__name__}: {e}"))
            finally:
                self.stats.jobs.append(job)
                del self.stats.jobs[: -self.keep_jobs]
            if self.queue.empty() and not self._has_repair_work():
                self.idle.set()

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
        tokenizer = self.model.tokenizer
        prompt = self.cache.align(req.method, req.prompt)  # resent replies as the ids that produced them
        session, reused = self.cache.fetch(req.method, prompt)
        if session is None:
            session = Session(self.model, method=req.method, prefill_step_size=self.prefill_step_size)
        suffix = prompt[len(session.tokens):]
        sent: list[str] = []
        if self._text_sm is None:  # mlx-lm's reasoning and tool-call markers, stripped from the text
            self._text_sm = make_text_state_machine(tokenizer, [])
        sm = self._text_sm.make_state("normal")
        stop = StopText(req.stop_words)
        kwargs: dict[str, Any] = dict(req.sampling, max_tokens=req.max_tokens, seed=req.seed,
                                      prompt_progress_callback=PrefillLog(log))  # INFO lines for a long prefill
        job.events.put(("start", {"cached_tokens": reused}))
        finish, last = "length", None
        ok = False
        steps = session.stream_generate(suffix, **kwargs)
        try:
            for last in steps:
                job.generated += 1
                reason = last.finish_reason
                sm, segments = TextStateMachine.split(sm, last.text)
                text = "".join(t for s, t in segments if s == "normal")
                if reason is not None:  # the end: nothing is held back any more
                    sm, flushed, _ = TextStateMachine.flush(sm)
                    text += flushed
                text, stopped = stop.feed(text)
                if stopped:
                    reason = "stop"
                elif reason is not None:
                    text += stop.flush()
                sent.append(text)
                piece: dict[str, Any] = {"text": text, "token": int(last.token)}
                if req.logprobs or req.top_logprobs:
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


def _finish_queued_work() -> None:
    """Wait for this thread's queued MLX work (mlx-lm evaluates one token ahead) before it ends: an
    op still inside a threaded BLAS call at process exit can hang OpenBLAS's shutdown (kvp_mlx._blas)."""
    from mlx_lm.generate import generation_stream

    for stream in (mx.cpu, generation_stream):
        mx.synchronize(stream)
