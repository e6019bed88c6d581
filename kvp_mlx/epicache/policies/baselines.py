"""The baselines of the EpiCache paper, all on the same block-wise prefill (sinks + recent,
single-query attention scores), and full KV."""

from __future__ import annotations

from typing import Any

from kvp_mlx.epicache.episodes import patched_prompt
from kvp_mlx.epicache.policies.registry import EvictionPolicy, ScorerFactory, register_policy
from kvp_mlx.epicache.prefill import PromptScorer, RecencyScorer, WindowScorer

SINKS = 4
SNAPKV_WINDOW = 64
KVZIP_QUERY = "Repeat the previous context."
INFINIPOT_QUERY = "Summarize the previous context."


def query_prompt(query: str) -> ScorerFactory:
    """Scored by the attention of the patched prompt ``query``."""

    def make(tokenizer: Any, episode: str) -> PromptScorer:
        return PromptScorer(tuple(patched_prompt(tokenizer, query)))

    return make


register_policy(EvictionPolicy(
    "streaming", f"StreamingLLM: the first {SINKS} positions (attention sinks) and the most recent ones",
    lambda tokenizer, episode: RecencyScorer(SINKS)))
register_policy(EvictionPolicy(
    "snapkv", f"SnapKV: by the attention of each block's last {SNAPKV_WINDOW} queries",
    lambda tokenizer, episode: WindowScorer(SNAPKV_WINDOW)))
register_policy(EvictionPolicy("kvzip", f'KVzip: by the attention of "{KVZIP_QUERY}"', query_prompt(KVZIP_QUERY)))
register_policy(EvictionPolicy(
    "infinipot", f'InfiniPot: by the attention of "{INFINIPOT_QUERY}"', query_prompt(INFINIPOT_QUERY)))
register_policy(EvictionPolicy("full", "full KV: nothing is evicted (no budget)", None))
