"""The Python API: a conversation's compressed memory (one per episode for EpiCache), which answers
a question from the right episode and hands a :class:`kvp_mlx.Session` its cache to continue from.

Policies (all with the same block-wise prefill, epicache.md 5): ``epicache`` (episodes' medoids as
the scoring prompt), ``streaming`` (sinks + recent), ``snapkv`` (each block's last 64 queries),
``kvzip`` ("Repeat the previous context."), ``infinipot`` ("Summarize the previous context."),
``full`` (no eviction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kvp_mlx.epicache.episodes import (
    INSTRUCTION, Embedder, Episodes, TokenEmbedder, cluster, patched_prompt,
)
from kvp_mlx.epicache.prefill import LEVELS, Memory, PromptScorer, RecencyScorer, Scorer, WindowScorer, build_memory
from kvp_mlx.errors import KVPError
from kvp_mlx.model import KVPModel

POLICIES = ("epicache", "streaming", "snapkv", "kvzip", "infinipot", "full")
KVZIP_QUERY = "Repeat the previous context."
INFINIPOT_QUERY = "Summarize the previous context."


def policy_scorer(policy: str, tokenizer: Any, snapkv_window: int = 64, sinks: int = 4) -> Scorer:
    """The scorer of a single-memory policy (``epicache`` needs episodes: see ConversationMemory)."""
    if policy == "full":
        return None
    if policy == "streaming":
        return RecencyScorer(sinks)
    if policy == "snapkv":
        return WindowScorer(snapkv_window)
    if policy == "kvzip":
        return PromptScorer(tuple(patched_prompt(tokenizer, KVZIP_QUERY)))
    if policy == "infinipot":
        return PromptScorer(tuple(patched_prompt(tokenizer, INFINIPOT_QUERY)))
    raise KVPError(f"unknown KV policy '{policy}' (choose from {', '.join(POLICIES)})")


@dataclass
class BuildStats:
    seconds: float  # building every memory (the offline cost)
    peak_kv_bytes: int  # the most any one build held
    memories: int


class ConversationMemory:
    """Compressed memories of one history (token ids ``history``) under ``policy``.

    ``budget``: entries per KV head per layer, or a list per layer (kvp_mlx.epicache.budgets);
    ``windows``: the conversation's utterance windows (``episodes.windows``), needed by
    ``epicache``; ``embedder``: default the model's own token embeddings; ``kvp_build``: the
    passes over the history run the auxiliary model and the predictor instead of the base.
    """

    def __init__(self, model: KVPModel, history: Sequence[int], policy: str = "epicache",
                 budget: int | Sequence[int] | None = None, *, block: int = 2048, level: str = "pair",
                 windows: Sequence[str] = (), n_episodes: int = 4, n_medoids: int = 4,
                 embedder: Embedder | None = None, kvp_build: bool = False, seed: int = 0):
        if policy not in POLICIES:
            raise KVPError(f"unknown KV policy '{policy}' (choose from {', '.join(POLICIES)})")
        if level not in LEVELS:
            raise KVPError(f"unknown eviction level '{level}' (choose from {', '.join(LEVELS)})")
        if policy != "full" and budget is None:
            raise KVPError(f"policy '{policy}' needs a KV budget")
        if kvp_build and (model.aux is None or model.predictor is None):
            raise KVPError("--kvp-build needs a KV Prediction model (auxiliary + predictor)")
        self.model, self.history, self.policy = model, [int(t) for t in history], policy
        self.embedder = embedder if embedder is not None else TokenEmbedder(model.base, model.tokenizer)
        self.episodes: Episodes | None = None
        tok = model.tokenizer
        if policy == "epicache":
            if not windows:
                raise KVPError("epicache needs the conversation's utterance windows to find episodes")
            self.episodes = cluster(windows, self.embedder, n_episodes, n_medoids, seed)
            texts = self.episodes.texts
            scorers: list[Scorer] = [PromptScorer(tuple(patched_prompt(tok, INSTRUCTION, t))) for t in texts]
        else:
            scorers = [policy_scorer(policy, tok)]
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

    def session(self, question: str = "", **session_options: Any):
        """A :class:`kvp_mlx.Session` (method ``base``) whose caches hold the compressed history of
        the episode ``question`` routes to; its turns continue at the true conversation position."""
        from kvp_mlx.methods import FilledCache
        from kvp_mlx.session import Session

        memory = self.memory_for(question)
        return Session(self.model, method="base", tokens=list(self.history),
                       caches=FilledCache(memory.cache, self.model.base), **session_options)
