"""EpiCache: the conversation's utterance windows clustered into episodes, one memory per episode,
each evicted with its episode's patched prompt (the instruction, the assistant header and the
episode's medoid windows); a question is answered from its nearest episode's memory."""

from __future__ import annotations

from typing import Any

from kvp_mlx.epicache.episodes import INSTRUCTION, patched_prompt
from kvp_mlx.epicache.policies.registry import EvictionPolicy, register_policy
from kvp_mlx.epicache.prefill import PromptScorer


def episode_scorer(tokenizer: Any, episode: str) -> PromptScorer:
    """Scored by the attention of the instruction and the episode's text."""
    return PromptScorer(tuple(patched_prompt(tokenizer, INSTRUCTION, episode)))


EPICACHE = register_policy(EvictionPolicy(
    "epicache", "EpiCache: one cache per episode of the conversation, evicted by the attention of its medoids",
    episode_scorer, episodic=True))
