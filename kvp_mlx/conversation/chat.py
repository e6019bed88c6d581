"""The conversation front-ends: the chat REPL with idle-time repair, and saved prompt caches.

``kvp-mlx chat`` (:class:`Chat`) reads a message per line, as ``mlx_lm.chat`` does (``>> ``
prompt; ``q`` quits, ``r`` resets, ``h`` helps), streams the reply of a :class:`~kvp_mlx.conversation.session.Session`
turn, then writes one statistics line. Standard output carries the conversation alone (prompts and
replies); everything else (banner, help, statistics, notes, errors) goes to standard error, so a
piped transcript stays clean.

With ``repair="idle"`` the session is repaired (:meth:`Session.repair`) while the REPL waits for
the next line: the line is read in a background thread (:class:`LineReader`) and the main thread
repairs chunk by chunk until the line has arrived (``should_stop``), so a message waits at most for
the chunk in progress. MLX is only ever used by the main thread: the input thread only reads, and
MLX does not exit cleanly once it has computed on another thread (ml-explore/mlx#3126: "terminate
called without an active exception" at exit).

With a KV budget (``--kv-budget``: the session's ``kv`` is a
:class:`~kvp_mlx.epicache.memory.BoundedMemory`) the same idle time compresses the history instead
(:meth:`Session.compress`: evict back to the budget, bring the other episodes' caches up to date),
stopping between caches once the line has arrived; each statistics line then also gives the
entries the cache holds per KV head and layer, the most it has held, the episode the message went
to and the KV memory of every cache.

Nothing is lost, nothing is left half done: Ctrl-C during a reply (before its first token, in the
middle, while it is being recorded) rolls that turn back (the session is as before the message; the
partial reply on the screen is not kept), and the chat goes on. Ctrl-C while waiting for a message
ends the chat as the end of input does; an idle repair it interrupts keeps its finished chunks.
SIGTERM and SIGHUP (a closed terminal) end it too, after rolling back a turn in flight: the session
is saved as on ``q`` and the exit status is 128 + the signal's number (143, 129), as a shell reports
a process ended by a signal. While the session is saved, signals wait until the file is written.

``cache_prompt`` prefills a session with a prompt and saves it (``kvp-mlx cache-prompt``);
``open_session`` resumes a saved one (``--prompt-cache-file``).
"""

from __future__ import annotations

import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator, TextIO

import mlx.core as mx

from kvp_mlx.conversation.session import Session
from kvp_mlx.conversation.session_file import load_session, save_session
from kvp_mlx.epicache.memory import BoundedMemory
from kvp_mlx.errors import KVPError
from kvp_mlx.model import KVPModel

PROMPT = ">> "
HELP_TEXT = "commands: q quit, r reset the conversation, h this help; any other line is a message"
REPAIR_MODES = ("idle", "off")
DEFAULT_REPAIR_STEP_SIZE = 256  # positions per repair chunk: the most a new turn waits for


def prompt_cache_path(text: str | Path) -> Path:
    """``--prompt-cache-file``: a ``.safetensors`` name (mlx-lm's prompt-cache format)."""
    path = Path(text)
    if path.suffix != ".safetensors":
        raise KVPError(f"a prompt cache file must end in .safetensors, got {path}")
    return path


KV_FLAGS = {"policy": "--kv-policy", "budget": "--kv-budget", "block": "--kv-block", "n_episodes": "--kv-episodes"}


def kv_budget(model: KVPModel, kv: dict | None) -> BoundedMemory | None:
    """The :class:`BoundedMemory` of ``kv`` (``policy``, ``budget``, ``block``, ``n_episodes``: the
    chat's ``--kv-*`` flags), or None."""
    if kv is None:
        return None
    return BoundedMemory(model, **kv)


def open_session(model: KVPModel, path: Path | None, *, method: str | None = None, max_kv_size: int | None = None,
                 system_prompt: str | None = None, prefill_step_size: int = 2048,
                 kv: dict | None = None) -> tuple[Session, bool]:
    """The saved session at ``path`` if that file exists (checked against what was asked: a method,
    a cache size, a system prompt or a KV budget other than the file's is refused), else a new one
    (``kv``: a KV budget, see :func:`kv_budget`). Returns ``(session, loaded)``."""
    if path is None or not path.exists():
        return Session(model, method=method, max_kv_size=max_kv_size, system_prompt=system_prompt,
                       prefill_step_size=prefill_step_size, kv=kv_budget(model, kv)), False
    session = load_session(model, path)
    session.prefill_step_size = prefill_step_size
    spec = session.kv.spec() if isinstance(session.kv, BoundedMemory) else None
    if kv is not None and spec is None:
        raise KVPError(f"{path} holds a session without a KV budget (leave out --kv-budget to continue it, "
                       "or use another file)")
    for key, wanted in (kv or {}).items():
        if spec is not None and wanted != spec[key]:
            flag = KV_FLAGS[key]
            raise KVPError(f"{path} holds a session with {flag} {spec[key]!r}, not {wanted!r} "
                           f"(leave {flag} out to continue it, or use another file)")
    asked = (("--method", method, session.method), ("--max-kv-size", max_kv_size, session.max_kv_size),
             ("--system-prompt", system_prompt, session.system_prompt))
    for flag, wanted, saved in asked:
        if wanted is not None and wanted != saved:
            raise KVPError(f"{path} holds a session with {flag} {saved!r}, not {wanted!r} "
                           f"(leave {flag} out to continue it, or use another file)")
    return session, True


@dataclass
class CachePromptReport:
    tokens: int  # tokens prefilled (the whole session)
    predicted: int  # of which base positions hold predicted K/V
    seconds: float
    peak_memory_gb: float
    path: Path


def cache_prompt(model: KVPModel, prompt: str, path: Path, *, method: str | None = None,
                 max_kv_size: int | None = None, system_prompt: str | None = None,
                 prefill_step_size: int = 2048, open_message: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> CachePromptReport:
    """A new session that has prefilled ``prompt`` (its method fills the caches; no generation),
    saved atomically to ``path`` (``kvp-mlx cache-prompt``); ``progress(processed, total)``: the fill's.
    ``open_message``: the prompt as ``mlx_lm.cache_prompt`` renders it, an open user message the next
    prompt continues (so ``mlx_lm.generate --prompt-cache-file`` continues it as kvp-mlx does)."""
    from kvp_mlx.conversation.session_file import mlx_lm_cached_ids

    path = prompt_cache_path(path)
    session = Session(model, method=method, max_kv_size=max_kv_size, system_prompt=system_prompt,
                      prefill_step_size=prefill_step_size)
    turn: Any = mlx_lm_cached_ids(model.tokenizer, prompt, system_prompt) if open_message else prompt
    mx.reset_peak_memory()
    tic = time.perf_counter()
    stats = session.prefill(turn, progress=progress)
    seconds = time.perf_counter() - tic
    peak = mx.get_peak_memory() / 1e9
    save_session(session, path, continue_as="message" if open_message else "turn")
    span = stats.predicted
    return CachePromptReport(stats.prefilled_tokens, span[1] - span[0] if span else 0, seconds, peak, path)


class LineReader:
    """Reads one line at a time in a background thread, so the main thread can repair meanwhile
    and see (``ready``) when the line has arrived. The thread never touches MLX."""

    def __init__(self, read_line: Callable[[], str | None]) -> None:
        self.read_line = read_line
        self._lines: queue.Queue = queue.Queue()

    def start(self) -> None:
        threading.Thread(target=self._read, name="kvp-chat-input", daemon=True).start()

    def _read(self) -> None:
        try:
            self._lines.put((self.read_line(), None))
        except BaseException as e:  # handed to the main thread by get()
            self._lines.put((None, e))

    def ready(self) -> bool:
        return not self._lines.empty()

    def get(self) -> str | None:
        line, error = self._lines.get()
        if error is not None:
            raise error
        return line


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: the chat saves and ends (exit status 128 + ``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@dataclass
class ChatTurnStats:
    """The statistics line of a turn."""

    ttft_s: float
    prefilled: int  # new tokens the method filled this turn
    reused: int  # tokens the caches already held
    predicted: int  # of the prefilled, base positions written with predicted K/V
    generated: int
    context: int  # tokens the session holds after the turn
    idle_repaired: int  # positions the idle repair recomputed while waiting for this turn's message
    kv: dict | None = None  # with a KV budget: kv_entries, kv_peak, episode, kv_mib

    def line(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (self.kv or {}).items())
        return (f"[stats] ttft_s={self.ttft_s:.4f} prefilled={self.prefilled} reused={self.reused} "
                f"predicted={self.predicted} generated={self.generated} context={self.context} "
                f"idle_repaired={self.idle_repaired}{extra}")


class Chat:
    """The REPL of ``kvp-mlx chat`` around a :class:`Session`.

    ``generation``: keywords for :meth:`Session.stream_generate` (sampling, ``max_tokens``, ...).
    ``read_line``: returns the next line without its newline, or None at the end of the input
    (default: a line of ``stdin``); tests replace it to control when input "arrives".
    ``save_to``: where the session is saved when the REPL ends (``q`` or end of input).
    """

    def __init__(self, session: Session, *, generation: dict[str, Any] | None = None, repair: str = "idle",
                 repair_step_size: int | None = DEFAULT_REPAIR_STEP_SIZE, save_to: Path | None = None,
                 stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
                 read_line: Callable[[], str | None] | None = None) -> None:
        if repair not in REPAIR_MODES:
            raise KVPError(f"--repair must be one of {', '.join(REPAIR_MODES)}, got {repair!r}")
        if repair_step_size is not None and (isinstance(repair_step_size, bool) or not isinstance(repair_step_size, int)
                                             or repair_step_size < 1):
            raise KVPError(f"--repair-step-size must be a positive integer, got {repair_step_size!r}")
        self.session = session
        self.generation = dict(generation or {})
        self.repair = repair
        self.repair_step_size = repair_step_size
        self.save_to = save_to
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self.reader = LineReader(read_line or self._readline)
        self.repairing = False  # an idle repair runs (or ran) while waiting for the current line
        self._repair_done = threading.Event()
        self._repair_done.set()
        self.stats: list[ChatTurnStats] = []
        self._idle_repaired = 0
        self._raised: int | None = None  # the signal whose exception is on its way (None: none)
        self._hold = False  # signals wait (the session is being saved)
        self._pending: int | None = None  # an ending signal that arrived while another was handled

    # --- input and output ------------------------------------------------------------------------

    def _readline(self) -> str | None:
        line = self.stdin.readline()
        if not line:
            return None
        return line[:-1] if line.endswith("\n") else line

    def say(self, text: str) -> None:
        try:
            print(text, file=self.stderr, flush=True)
        except (OSError, ValueError):  # the terminal has gone (SIGHUP): the chat still saves
            pass

    def _write(self, text: str) -> None:
        try:
            self.stdout.write(text)
            self.stdout.flush()
        except (OSError, ValueError):
            pass

    # --- signals ---------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP :class:`Terminated`, in the main thread,
        one at a time: one that arrives while another is handled, or while the session is saved,
        waits (an ending one is raised once the first is handled; a second Ctrl-C is dropped)."""
        if self._hold or self._raised is not None:
            if signum in ENDING_SIGNALS:
                self._pending = signum
            return
        self._raised = signum
        if signum in ENDING_SIGNALS:
            raise Terminated(signum)
        raise KeyboardInterrupt

    def _handled(self) -> None:
        """The signal raised last has been handled: the next one may be raised; an ending one that
        waited is raised now."""
        self._raised = None
        pending, self._pending = self._pending, None
        if pending is not None:
            self._raised = pending
            raise Terminated(pending)

    def _install_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, *ENDING_SIGNALS)}

    def wait_for_repair(self, timeout: float | None = None) -> bool:
        """Block until the idle repair of the current wait (if any) has ended by itself. Called from
        ``read_line`` (it runs in the input thread), it lets a test decide that input arrives only
        after the repair."""
        return self._repair_done.wait(timeout)

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        """Read and answer messages until ``q``, the end of the input, Ctrl-C at the prompt, SIGTERM or
        SIGHUP; save. Exit status 0, or 128 + the signal's number after SIGTERM or SIGHUP."""
        previous = self._install_handlers()
        status = 0
        try:
            try:
                self._loop()
            except Terminated as e:
                status = 128 + e.signum
            finally:  # whatever ended the loop, the session is consistent (a turn in flight was rolled back)
                self._save()
            if self._pending is not None:
                status = 128 + self._pending
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return status

    def _save(self) -> None:
        if self.save_to is None:
            return
        self._hold = True  # signals wait: the file is written whole
        try:
            self.say(f"[chat] saving the session to {self.save_to}")
            save_session(self.session, self.save_to)
            state = self.session._repair
            repair = (f", repaired {state.position - state.start} positions of {len(self.session.tokens) - state.start}"
                      if state is not None else "")
            self.say(f"[chat] session saved to {self.save_to} ({len(self.session.tokens)} tokens{repair})")
        finally:
            self._hold = False

    def _loop(self) -> None:
        kv = self.session.kv if isinstance(self.session.kv, BoundedMemory) else None
        budget = "" if kv is None else (f", KV budget {kv.policy} {kv.budget} per head per layer, "
                                        f"block {kv.block}")
        self.say(f"[chat] {self.session.model.path} (method {self.session.method}, repair {self.repair}{budget}); "
                 f"{HELP_TEXT}")
        while True:
            line = self._wait_for_input()
            if line is None:  # end of input (or Ctrl-C at the prompt): finish the prompt's line
                self._write("\n")
                break
            query = line.strip()
            if query == "q":
                break
            if query == "r":
                self.session.reset()
                self._idle_repaired = 0
                self.say("[chat] conversation reset")
                continue
            if query == "h":
                self.say(HELP_TEXT)
                continue
            if not query:
                continue
            self.turn(line)

    def _wait_for_input(self) -> str | None:
        """Prompt, then wait for a line (read in the input thread). Meanwhile, with ``repair="idle"``,
        this (main) thread repairs the session chunk by chunk until the line has arrived: MLX
        stays on the main thread (it does not exit cleanly after use from another thread), and a
        message waits at most for the chunk in progress."""
        self.repairing = self.repair == "idle" and bool(self.session.predicted)
        self._repair_done.clear()
        self.stdout.write(PROMPT)
        self.stdout.flush()
        self.reader.start()
        try:
            if self.session.kv is not None:  # idle compression (the next turn does what is left)
                self.session.compress(should_stop=self.reader.ready)
            if self.repairing:
                report = self.session.repair(should_stop=self.reader.ready, prefill_step_size=self.repair_step_size)
                self._idle_repaired += report.positions
            self._repair_done.set()
            return self.reader.get()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave as at the end of input
            self._handled()
            return None
        finally:
            self._repair_done.set()

    def turn(self, message: str) -> ChatTurnStats | None:
        """One turn: stream the reply to stdout, then the statistics line to stderr. A one-line
        error (the message does not fit, ...) or Ctrl-C ends the turn, not the REPL."""
        before = len(self.session.turns)
        steps = self.session.stream_generate(message, **self.generation)
        try:
            try:
                for response in steps:
                    self._write(response.text)
            except BaseException as e:  # the turn is rolled back, wherever the exception arose
                _abandon(steps, e)
                raise
        except KVPError as e:
            self._write("\n")
            self.say(f"error: {e}")
        except KeyboardInterrupt:
            self._write("\n")
            kept = len(self.session.turns) > before  # it had finished: nothing to roll back
            self.say("[chat] reply interrupted" + ("" if kept else ": the turn was not kept"))
            self._handled()
        else:
            self._write("\n")
        if len(self.session.turns) == before:
            return None
        t = self.session.turns[-1]
        span = t.predicted
        kv = self.session.kv if isinstance(self.session.kv, BoundedMemory) else None
        kv_stats = None if kv is None else dict(kv_entries=kv.entries(kv.cache), kv_peak=kv.peak_entries,
                                                episode=kv.active, kv_mib=f"{kv.kv_bytes() / 2**20:.3f}")
        stats = ChatTurnStats(t.ttft_s, t.prefilled_tokens, t.reused_tokens, span[1] - span[0] if span else 0,
                              t.generated_tokens, self.session.offset, self._idle_repaired, kv_stats)
        self._idle_repaired = 0
        self.stats.append(stats)
        self.say(stats.line())
        return stats


def _abandon(steps: Iterator, error: BaseException) -> None:
    """Roll back the turn of ``steps`` (a session's stream) after ``error``: thrown into the stream
    when it is suspended between tokens (the session restores itself and lets it out again); a
    stream that raised it, or had finished, is left as it is."""
    throw = getattr(steps, "throw", None)
    if throw is None:
        return
    try:
        throw(error)
    except BaseException as e:  # the same error, back out (or the stream's own)
        if e is not error:
            raise
