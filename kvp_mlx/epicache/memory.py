"""The Python API: a conversation's compressed memory (one per episode for EpiCache), which answers
a question from the right episode and hands a :class:`kvp_mlx.Session` its cache to continue from.

A policy is any registered in :mod:`kvp_mlx.epicache.policies` (built in: ``epicache``, whose
episodes' medoids make the scoring prompts, and the paper's baselines ``streaming``, ``snapkv``,
``kvzip``, ``infinipot``, and ``full``, which never evicts), all on the same block-wise prefill.

:class:`BoundedMemory` keeps a live conversation (a :class:`kvp_mlx.Session`'s ``kv``, ``kvp-mlx
chat --kv-budget``) within a budget turn after turn: the turns' tokens play the blocks of the
block-wise prefill (see its docstring for when it evicts and what it bounds).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from kvp_mlx.conversation.checkpoint import CacheMark
from kvp_mlx.conversation.session import Session
from kvp_mlx.epicache.cache import CompressedKVCache, copy_cache
from kvp_mlx.epicache.episodes import Embedder, Episodes, TokenEmbedder, Utterance, cluster, windows
from kvp_mlx.epicache.policies import EvictionPolicy, get_policy
from kvp_mlx.epicache.prefill import (
    LEVELS, Memory, Scorer, build_memory, compress_tail, extend_memory, layer_budgets, make_compressed_cache,
)
from kvp_mlx.errors import KVPError
from kvp_mlx.model import KVPModel


@dataclass
class BuildStats:
    seconds: float  # building every memory (the offline cost)
    peak_kv_bytes: int  # the most any one build held
    memories: int


class ConversationMemory:
    """Compressed memories of one history (token ids ``history``) under ``policy`` (a registered
    one: :func:`kvp_mlx.epicache.policies.available_policies`).

    ``budget``: entries per KV head per layer, or a list per layer (kvp_mlx.epicache.budgets); a
    policy that never evicts (``full``) ignores it; ``windows``: the conversation's utterance
    windows (``episodes.windows``), needed by an episodic policy (``epicache``); ``embedder``:
    default the model's own token embeddings; ``kvp_build``: the passes over the history run the
    auxiliary model and the predictor instead of the base.
    """

    def __init__(self, model: KVPModel, history: Sequence[int], policy: str = "epicache",
                 budget: int | Sequence[int] | None = None, *, block: int = 2048, level: str = "pair",
                 windows: Sequence[str] = (), n_episodes: int = 4, n_medoids: int = 4,
                 embedder: Embedder | None = None, kvp_build: bool = False, seed: int = 0):
        eviction = get_policy(policy)
        if level not in LEVELS:
            raise KVPError(f"unknown eviction level '{level}' (choose from {', '.join(LEVELS)})")
        if eviction.evicts and budget is None:
            raise KVPError(f"policy '{policy}' needs a KV budget")
        if not eviction.evicts:
            budget = None  # nothing is evicted: no budget holds the memory
        if kvp_build and (model.aux is None or model.predictor is None):
            raise KVPError("--kvp-build needs a KV Prediction model (auxiliary + predictor)")
        self.model, self.history, self.policy = model, [int(t) for t in history], policy
        self.budget, self.block, self.level = budget, block, level
        self.windows = list(windows)
        self.n_episodes, self.n_medoids, self.seed = n_episodes, n_medoids, seed
        self.embedder = embedder if embedder is not None else TokenEmbedder(model.base, model.tokenizer)
        self.episodes: Episodes | None = None
        tok = model.tokenizer
        if eviction.episodic:
            if not windows:
                raise KVPError(f"{policy} needs the conversation's utterance windows to find episodes")
            self.episodes = cluster(windows, self.embedder, n_episodes, n_medoids, seed)
            scorers = [eviction.scorer(tok, t) for t in self.episodes.texts]
        else:
            scorers = [eviction.scorer(tok)]
        self.scorers = scorers
        tic = time.perf_counter()
        self.memories: list[Memory] = []
        for scorer in scorers:
            extra: dict[str, Any] = {}
            if kvp_build:
                extra = dict(aux=model.aux, predictor=model.predictor, dtype=model.dtype)
            self.memories.append(build_memory(model.base, self.history, budget, scorer, block=block, level=level,
                                              **extra))
        self.stats = BuildStats(time.perf_counter() - tic, max(m.peak_kv_bytes for m in self.memories),
                                len(self.memories))

    def route(self, question: str) -> int:
        """Which memory answers ``question`` (the nearest episode; 0 for single-memory policies)."""
        if self.episodes is None:
            return 0
        return self.episodes.route(np.asarray(self.embedder([question]))[0])

    def memory_for(self, question: str) -> Memory:
        """A copy of the memory that answers ``question`` (the copy can be extended freely)."""
        return self.memories[self.route(question)].copy()

    def session(self, question: str = "", **session_options: Any) -> Session:
        """A :class:`kvp_mlx.Session` (method ``base``) whose caches hold the compressed history of
        the episode ``question`` routes to; its turns continue at the true conversation position.

        Under an evicting policy the session stays bounded (its ``kv`` is a :class:`BoundedMemory`
        holding copies of every episode's memory, the same episodes, budget and block): its turns
        are routed and compressed like ``kvp-mlx chat --kv-budget``'s. ``full`` gives a plain one."""
        if self.policy == "full" or self.budget is None:
            memory = self.memory_for(question)
            return Session.resume(self.model, self.history, memory.cache, **session_options)
        kv = BoundedMemory(self.model, self.policy, self.budget, block=self.block, level=self.level,
                           n_episodes=self.n_episodes, n_medoids=self.n_medoids, seed=self.seed,
                           embedder=self.embedder)
        kv.caches = [m.copy().cache for m in self.memories]
        kv.episodes, kv.scorers = self.episodes, list(self.scorers)
        kv.prior_windows = list(self.windows)
        kv.clustered_windows = len(self.windows)
        kv.active = self.route(question)
        kv.peak_entries = max(kv.entries(c) for c in kv.caches)
        return Session.resume(self.model, self.history, kv=kv, **session_options)


@dataclass
class CompressReport:
    """What :meth:`BoundedMemory.compress` (a session's idle-time work) did."""

    caught_up: int = 0  # positions forwarded onto episode caches that lagged behind the conversation
    evictions: int = 0  # caches scored and evicted back to the budget
    complete: bool = True  # False: stopped (a message arrived) with work left for the next call
    seconds: float = 0.0


def _text_of(model: KVPModel, prompt: Any) -> str:
    """A turn's user text, for episodes and routing (chat messages: their contents joined)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return "\n".join(str(m.get("content", "")) for m in prompt if m.get("role") != "system")
    return str(model.tokenizer.decode([int(t) for t in prompt])) if prompt else ""


@dataclass
class BoundedMemory:
    """A conversation's KV cache kept within ``budget`` entries per KV head and layer (a
    :class:`kvp_mlx.Session`'s ``kv``; ``kvp-mlx chat --kv-budget``).

    The turns' tokens are the blocks of the block-wise prefill (:mod:`kvp_mlx.epicache.prefill`):
    a turn appends its message and reply to the live compressed cache; :meth:`compress` (between
    turns, in idle time) scores and evicts it back to ``budget`` once it holds more. A turn that
    would take the cache past ``budget + block`` (a long message) is first prefilled block by block
    with eviction after each block, exactly as :func:`build_memory` does, so the cache never holds
    more than ``budget + block`` entries per head and layer (``pair``: per layer, ``(budget +
    block) * n_kv_heads``), provided a reply (``max_tokens``) fits in a block.

    ``epicache``: the utterances are the turns (the user's messages and the replies, in windows of
    ``window``). The first time the cache must be evicted, they are clustered into ``n_episodes``
    episodes (fewer while there are fewer windows); the cache is copied once per episode and each
    copy evicted with its episode's patched prompt. From then on each new message is routed to its
    nearest episode (:meth:`Episodes.route`), the turn runs on that episode's cache, and
    :meth:`compress` brings the other episodes' caches up to date (block-wise, evicting with their
    own prompts). Whenever the conversation has twice as many windows as at the last clustering,
    the episodes are found again, from the live cache (what was evicted stays evicted: the
    conversation is not replayed), so the total cost of clustering stays linear. The other
    policies keep one cache. Before any eviction every policy keeps exactly what a plain session
    keeps.
    """

    model: KVPModel
    policy: str = "epicache"
    budget: int | Sequence[int] = 2048
    block: int = 2048
    n_episodes: int = 4
    n_medoids: int = 4
    window: int = 4
    level: str = "pair"
    seed: int = 0
    embedder: Embedder | None = None
    caches: list[list] = field(default_factory=list)  # per episode (one before episodes are found)
    episodes: Episodes | None = None
    scorers: list[Scorer | None] = field(default_factory=list)  # per cache; [None] before episodes (epicache)
    active: int = 0  # the cache the session's turns run on
    utterances: list[Utterance] = field(default_factory=list)
    peak_entries: int = 0  # the most entries per KV head any layer of any cache held
    clustered_windows: int = 0  # windows of utterances when the episodes were last found
    prior_windows: list[str] = field(default_factory=list)  # windows of a history given as text (ConversationMemory)

    def __post_init__(self) -> None:
        policy = get_policy(self.policy, evicting=True)
        budgets = [self.budget] if isinstance(self.budget, int) else list(self.budget)
        for name, value in (("KV budget", min(budgets, default=0)), ("KV block", self.block),
                            ("number of episodes", self.n_episodes), ("number of medoids", self.n_medoids),
                            ("episode window", self.window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVPError(f"the {name} must be a positive integer, got {value!r}")
        if self.level not in LEVELS:
            raise KVPError(f"unknown eviction level '{self.level}' (choose from {', '.join(LEVELS)})")
        if self.embedder is None and policy.episodic:
            self.embedder = TokenEmbedder(self.model.base, self.model.tokenizer)
        if not self.caches:
            self.reset()

    # --- state ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation: one fresh cache, no episodes."""
        policy = self.eviction_policy
        self.caches = [make_compressed_cache(self.model.base)]
        self.scorers = [None if policy.episodic else policy.scorer(self.model.tokenizer)]
        self.episodes, self.active, self.utterances, self.peak_entries = None, 0, [], 0
        self.clustered_windows, self.prior_windows = 0, []

    @property
    def eviction_policy(self) -> EvictionPolicy:
        """The registered policy named ``policy``."""
        return get_policy(self.policy, evicting=True)

    def episode_scorers(self, texts: Sequence[str]) -> list[Scorer | None]:
        """The scorers of the episodes whose texts are ``texts`` (one cache each)."""
        return [self.eviction_policy.scorer(self.model.tokenizer, t) for t in texts]

    @property
    def cache(self) -> list:
        """The cache the session's turns run on."""
        return self.caches[self.active]

    def _budgets(self) -> list[int]:
        return layer_budgets(self.budget, len(self.cache))

    @staticmethod
    def entries(cache: list) -> int:
        """The most entries per KV head any compressed layer of ``cache`` holds (pair eviction: the
        layer's valid entries over its heads, rounded up)."""
        return max((math.ceil(c.kept_entries() / c.n_heads) for c in cache if isinstance(c, CompressedKVCache)),
                   default=0)

    @staticmethod
    def held(cache: list) -> int:
        return int(cache[0].offset) if cache else 0

    @staticmethod
    def tail(cache: list) -> int:
        """Entries appended since the last eviction (the current block)."""
        return next((c.length - c.compressed for c in cache if isinstance(c, CompressedKVCache)), 0)

    def over(self, cache: list) -> bool:
        """Whether some layer holds more than its budget per head."""
        budgets = self._budgets()
        return any(math.ceil(c.kept_entries() / c.n_heads) > budgets[i]
                   for i, c in enumerate(cache) if isinstance(c, CompressedKVCache))

    def kv_bytes(self) -> int:
        """Bytes every cache holds (all episodes)."""
        return sum(int(c.nbytes) for cache in self.caches for c in cache)

    def _see(self, cache: list) -> None:
        self.peak_entries = max(self.peak_entries, self.entries(cache))

    # --- eviction --------------------------------------------------------------------------------

    def _evict(self, index: int, tokens: Sequence[int]) -> None:
        """Score and evict cache ``index`` back to the budget (its tail forwarded by the turns)."""
        cache = self.caches[index]
        held = self.held(cache)
        tail = self.tail(cache)
        compress_tail(self.model.base, cache, tokens[held - tail : held], self.budget, self.scorers[index],
                      level=self.level)

    def _windows(self, pending: str | None = None) -> list[str]:
        utterances = list(self.utterances) + ([Utterance("User", pending)] if pending else [])
        return list(self.prior_windows) + windows(utterances, self.window)

    def _cluster_due(self, pending: str | None = None) -> bool:
        """An episodic policy: no episodes yet, or twice the windows of the last clustering."""
        if not self.eviction_policy.episodic:
            return False
        return self.episodes is None or len(self._windows(pending)) >= 2 * self.clustered_windows

    def _find_episodes(self, tokens: Sequence[int], pending: str | None = None) -> None:
        """Cluster the turns so far into episodes: one copy of the live cache per episode, each
        evicted with its episode's patched prompt."""
        texts = self._windows(pending) or [pending or ""]
        self.clustered_windows = len(texts)
        assert self.embedder is not None
        self.episodes = cluster(texts, self.embedder, self.n_episodes, self.n_medoids, self.seed)
        self.scorers = self.episode_scorers(self.episodes.texts)
        base = self.caches[self.active]
        self.caches = [base] + [copy_cache(base) for _ in self.scorers[1:]]
        self.active = 0
        for e in range(len(self.caches)):
            self._evict(e, tokens)

    def route(self, text: str) -> int:
        """The episode a message goes to (0 before episodes exist, or for one-cache policies)."""
        if self.episodes is None:
            return 0
        assert self.embedder is not None
        return self.episodes.route(np.asarray(self.embedder([text]))[0])

    def _extend(self, index: int, tokens: Sequence[int]) -> int:
        """Forward ``tokens`` onto cache ``index`` block by block, evicting after each block."""
        if not tokens:
            return 0
        cache = self.caches[index]
        track = extend_memory(self.model.base, cache, tokens, self.budget, self.scorers[index], block=self.block,
                              level=self.level)
        self.peak_entries = max(self.peak_entries, track.peak_entries)
        return len(tokens)

    # --- the session's hooks -------------------------------------------------------------------

    def before_turn(self, history: Sequence[int], prompt: Any, ids: Sequence[int], fill_to: int,
                    reserve: int) -> int:
        """Before a turn fills ``ids[:fill_to]`` (``history`` and the new message) and then adds up to
        ``reserve`` positions (the reply): route the message to its episode's cache (:attr:`cache`,
        which the session runs the turn on), and when the turn would take that cache past
        ``budget + block``, prefill what it lacks block-wise with eviction now. Returns the positions
        that cache held before (what the turn reused)."""
        if reserve > self.block:
            raise KVPError(f"a turn's decoding (its last prompt token and the reply: up to {reserve} positions) does "
                           f"not fit in a KV block of {self.block}: lower max_tokens or raise the block")
        text = _text_of(self.model, prompt)
        self.active = self.route(text)
        cache = self.cache
        held = self.held(cache)
        if held > fill_to:
            raise KVPError("internal: an episode cache holds more than the conversation")
        if self.entries(cache) + (fill_to - held) + reserve > max(self._budgets()) + self.block:
            if self._cluster_due(text):
                self._find_episodes(history, pending=text)
                self.active = self.route(text)
                cache = self.cache
            elif self.over(cache) and self.tail(cache):
                self._evict(self.active, history)
            self._extend(self.active, list(ids[held:fill_to]))
        return held

    def after_turn(self, prompt: Any, reply: Sequence[int] | None) -> None:
        """After a turn: its utterances (for episodes) and the peak it reached."""
        text = _text_of(self.model, prompt)
        if text:
            self.utterances.append(Utterance("User", text))
        if reply:
            self.utterances.append(Utterance("Assistant", str(self.model.tokenizer.decode(list(reply)))))
        self._see(self.cache)

    def compress(self, history: Sequence[int], should_stop: Callable[[], bool] | None = None) -> CompressReport:
        """The idle-time work between turns: evict the live cache back to the budget if it holds
        more (epicache: find the episodes the first time), then bring every other episode's cache
        up to the conversation (block-wise, evicting with its own prompt). ``should_stop`` is asked
        between caches (a message has arrived): the rest waits for the next call or turn."""
        import time as _time

        tic = _time.perf_counter()
        report = CompressReport()
        tokens = history
        if self.over(self.cache) and self.tail(self.cache):
            if self._cluster_due():
                self._find_episodes(tokens)
                report.evictions += len(self.caches)
            else:
                self._evict(self.active, tokens)
                report.evictions += 1
        target = self.held(self.cache)
        for e in range(len(self.caches)):
            cache = self.caches[e]
            if e == self.active or self.held(cache) >= target:
                continue
            if should_stop is not None and should_stop():
                report.complete = False
                break
            report.caught_up += self._extend(e, tokens[self.held(cache) : target])
            report.evictions += 1
        report.seconds = _time.perf_counter() - tic
        return report

    def snapshot(self) -> Any:
        """What a turn or a compression may change, for :meth:`restore` (no cache data is copied)."""
        return (list(self.caches), [CacheMark.of(c, 0) for c in self.caches], self.episodes, list(self.scorers),
                self.active, list(self.utterances), self.peak_entries, self.clustered_windows,
                list(self.prior_windows))

    def restore(self, snapshot: Any) -> None:
        """The memory as it was at ``snapshot``."""
        caches, marks, *state = snapshot
        for mark in marks:
            mark.restore()
        self.caches = caches
        (self.episodes, self.scorers, self.active, self.utterances, self.peak_entries, self.clustered_windows,
         self.prior_windows) = state

    def spec(self) -> dict:
        """What a saved session records of its KV policy."""
        return dict(policy=self.policy, budget=self.budget if isinstance(self.budget, int) else list(self.budget),
                    block=self.block, n_episodes=self.n_episodes, n_medoids=self.n_medoids, window=self.window,
                    level=self.level, seed=self.seed)
