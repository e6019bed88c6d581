"""EpiCache on MLX: bounded-memory conversation caches (block-wise prefill with eviction, episodes,
per-layer budgets; Kim et al., arXiv 2509.17396), and its baselines. The modules: ``cache`` (the
compressed cache), ``prefill`` (block-wise prefill and eviction), ``scoring`` (what scorers compute),
``policies`` (eviction policies and their registry), ``episodes``, ``budgets``, ``memory`` (the Python
API), ``loaders`` and ``evaluate`` (conv-eval)."""

from kvp_mlx.epicache.cache import CompressedKVCache, enable_compressed_caches
from kvp_mlx.epicache.memory import ConversationMemory
from kvp_mlx.epicache.policies import (
    EvictionPolicy, available_policies, get_policy, register_policy, unregister_policy,
)
from kvp_mlx.epicache.prefill import (
    LEVELS, Memory, PromptScorer, RecencyScorer, Scorer, WindowScorer, build_memory,
)

__all__ = [
    "CompressedKVCache", "enable_compressed_caches", "ConversationMemory",
    "EvictionPolicy", "available_policies", "get_policy", "register_policy", "unregister_policy",
    "LEVELS", "Memory", "PromptScorer", "RecencyScorer", "Scorer", "WindowScorer", "build_memory",
]
