"""Episodes: windows of utterances, embedded, clustered with k-means; medoids make each episode's
scoring prompt, and a question goes to the episode whose centroid is nearest.

Embeddings default to the mean of the target model's own token embeddings over a text's tokens
(no second model); :class:`HiddenStateEmbedder` mean-pools the final hidden states of any mlx-lm
model directory instead. k-means is scikit-learn's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from kvp_mlx.adapters import arch_of
from kvp_mlx.errors import KVPError

INSTRUCTION = (
    "Extract essential information from this conversation segment. Identify speaker names, personas, key "
    "events with dates/times, personal details, commitments, opinions, relationships, emotional moments, "
    "and unique experiences."
)


@dataclass(frozen=True)
class Utterance:
    speaker: str
    text: str
    session: int = 0


def utterance_line(u: Utterance) -> str:
    return f'{u.speaker} said, "{u.text}"\n'


def windows(utterances: Sequence[Utterance], size: int = 4) -> list[str]:
    """The conversation in windows of ``size`` utterances, each written ``{speaker} said, "{text}"``."""
    if size < 1:
        raise KVPError("the episode window must hold at least one utterance")
    return ["".join(utterance_line(u) for u in utterances[i : i + size]) for i in range(0, len(utterances), size)]


class Embedder(Protocol):
    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...  # [N, dim], not normalised


class TokenEmbedder:
    """Mean of a model's own input token embeddings over each text's tokens."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        arch = arch_of(model)
        self.table = getattr(getattr(model, arch.inner_attr), arch.embed_attr)
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for text in texts:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False)) or [0]
            out.append(np.array(self.table(mx.array(ids)).astype(mx.float32).mean(axis=0)))
        return np.stack(out)


class HiddenStateEmbedder:
    """Mean of an mlx-lm model's final hidden states (before its head) over each text's tokens."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        self.inner = getattr(model, arch_of(model).inner_attr)
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for text in texts:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False)) or [0]
            h = self.inner(mx.array([ids], dtype=mx.int32))[0].astype(mx.float32)
            out.append(np.array(h.mean(axis=0)))
        return np.stack(out)


def load_embedder(directory: str) -> Embedder:
    """``--embedder DIR``: an mlx-lm model directory, mean-pooled final hidden states."""
    from kvp_mlx.model import load_lm, resolve_model_path

    model, tokenizer, _ = load_lm(resolve_model_path(directory), "embedder")
    return HiddenStateEmbedder(model, tokenizer)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Episodes:
    """k-means over window embeddings: centroids, each window's cluster, each episode's medoid text."""

    centroids: np.ndarray  # [E, dim], as k-means left them (means of unit vectors)
    labels: np.ndarray  # [n_windows]
    medoids: list[list[int]]  # per episode: window indices, chronological
    texts: list[str]  # per episode: its medoid windows joined by newlines

    def route(self, query_embedding: np.ndarray) -> int:
        """The episode whose centroid has the largest dot product with the normalised query."""
        return int(np.argmax(self.centroids @ _normalise(query_embedding.reshape(-1))))


def cluster(window_texts: Sequence[str], embedder: Embedder, n_episodes: int = 4, n_medoids: int = 4,
            seed: int = 0) -> Episodes:
    """Embed and L2-normalise the windows, k-means into ``n_episodes`` (n_init 10, fixed seed); the
    ``n_medoids`` windows nearest each centroid by cosine, in chronological order, are its text."""
    try:
        from sklearn.cluster import KMeans  # type: ignore[import-untyped]
    except ImportError:
        raise KVPError("episodes need scikit-learn: pip install 'kvp-mlx[epicache]'") from None
    if not window_texts:
        raise KVPError("no conversation windows to cluster")
    if n_episodes < 1 or n_medoids < 1:
        raise KVPError("the numbers of episodes and medoids must be positive")
    emb = _normalise(np.asarray(embedder(list(window_texts)), dtype=np.float64))
    k = min(n_episodes, len(window_texts))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(emb)
    centroids = km.cluster_centers_
    cos = emb @ _normalise(centroids).T  # [n_windows, E]
    medoids = []
    for e in range(k):
        nearest = np.argsort(-cos[:, e], kind="stable")[:n_medoids]
        medoids.append(sorted(int(i) for i in nearest))
    texts = ["\n".join(window_texts[i] for i in m) for m in medoids]
    return Episodes(centroids, np.asarray(km.labels_), medoids, texts)


def patched_prompt(tokenizer: Any, instruction: str, text: str = "") -> list[int]:
    """Token ids of a scoring prompt: the instruction as a user turn, the assistant header, then
    ``text`` (an episode's medoids); without a chat template, the instruction, a newline, ``text``."""
    if getattr(tokenizer, "has_chat_template", False):
        head = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer.encode(head + text, add_special_tokens=False))
    return list(tokenizer.encode(instruction + "\n" + text, add_special_tokens=False))
