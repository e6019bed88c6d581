"""Eviction policies of EpiCache's block-wise prefill: the interface and its registry
(:mod:`.registry`), and the built-in policies, which register themselves on import as any other
module would: :mod:`.epicache` (episodes) and :mod:`.baselines` (streaming, snapkv, kvzip,
infinipot, full)."""

from kvp_mlx.epicache.policies.registry import (
    EvictionPolicy, ScorerFactory, available_policies, describe_policies, get_policy, register_policy,
    unregister_policy,
)
# The built-in policies register themselves; epicache first (the default, listed first).
from kvp_mlx.epicache.policies import epicache  # noqa: F401
from kvp_mlx.epicache.policies import baselines  # noqa: F401

__all__ = ["EvictionPolicy", "ScorerFactory", "available_policies", "describe_policies", "get_policy",
           "register_policy", "unregister_policy"]
