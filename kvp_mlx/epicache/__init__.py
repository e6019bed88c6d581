"""EpiCache on MLX: bounded-memory conversation caches (block-wise prefill with eviction, episodes,
per-layer budgets; Kim et al., arXiv 2509.17396), and its baselines. The modules:
``cache`` (the compressed cache), ``prefill`` (block-wise prefill, scoring, eviction), ``episodes``,
``budgets``, ``memory`` (the Python API), ``loaders`` and ``evaluate`` (conv-eval)."""

from kvp_mlx.epicache.cache import CompressedKVCache, enable_compressed_caches
from kvp_mlx.epicache.memory import POLICIES, ConversationMemory, policy_scorer
from kvp_mlx.epicache.prefill import (
    LEVELS, Memory, PromptScorer, RecencyScorer, WindowScorer, build_memory,
)

__all__ = [
    "CompressedKVCache", "enable_compressed_caches", "POLICIES", "ConversationMemory", "policy_scorer",
    "LEVELS", "Memory", "PromptScorer", "RecencyScorer", "WindowScorer", "build_memory",
]
