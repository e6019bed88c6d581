"""The eviction-policy interface and its registry. A policy is a name, one line for ``--help``
and how it builds the :class:`~kvp_mlx.epicache.prefill.Scorer` that ranks a cache's entries after
each block. ``kvp-mlx chat --kv-policy``, ``kvp-mlx conv-eval --policy``,
:class:`~kvp_mlx.epicache.memory.ConversationMemory`, :class:`~kvp_mlx.epicache.memory.BoundedMemory`
and :func:`~kvp_mlx.epicache.evaluate.evaluate` accept every registered policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kvp_mlx.epicache.prefill import Scorer
from kvp_mlx.errors import KVPError

# (tokenizer, episode text) -> the scorer of one memory; the text is "" for a policy without episodes
ScorerFactory = Callable[[Any, str], Scorer]


@dataclass(frozen=True)
class EvictionPolicy:
    """An eviction policy of the block-wise prefill.

    ``make_scorer`` builds the scorer of one memory; None: the policy never evicts (full KV, no
    budget). ``episodic``: one memory per episode of the conversation, each scored with its
    episode's text (its medoid windows), a question answered from its nearest episode's memory.
    """

    name: str
    summary: str  # one line, shown by --help
    make_scorer: ScorerFactory | None
    episodic: bool = False

    @property
    def evicts(self) -> bool:
        return self.make_scorer is not None

    def scorer(self, tokenizer: Any, episode: str | None = None) -> Scorer | None:
        """The scorer of a memory (an episodic policy: of the episode whose text is ``episode``);
        None when the policy never evicts."""
        if self.make_scorer is None:
            return None
        if self.episodic and episode is None:
            raise KVPError(f"KV policy '{self.name}' scores each episode with its own text: it needs the episodes")
        return self.make_scorer(tokenizer, episode or "")


_REGISTERED: dict[str, EvictionPolicy] = {}


def register_policy(policy: EvictionPolicy) -> EvictionPolicy:
    """Make ``policy`` available by its name wherever a KV policy is chosen; returns it."""
    if not policy.name or any(ch.isspace() or ch in ",%" for ch in policy.name):
        raise KVPError(f"a KV policy's name must be one word without ',' or '%', got {policy.name!r}")
    if not policy.summary or "\n" in policy.summary:
        raise KVPError(f"KV policy '{policy.name}' needs a one-line summary")
    if policy.name in _REGISTERED:
        raise KVPError(f"a KV policy named '{policy.name}' is already registered")
    _REGISTERED[policy.name] = policy
    return policy


def unregister_policy(name: str) -> EvictionPolicy:
    """Remove the registered policy ``name`` (a one-line error if there is none); returns it."""
    policy = get_policy(name)
    del _REGISTERED[name]
    return policy


def available_policies(*, evicting: bool = False) -> tuple[str, ...]:
    """The registered policies' names, in registration order (``evicting``: those that evict)."""
    return tuple(name for name, p in _REGISTERED.items() if p.evicts or not evicting)


def get_policy(name: str, *, evicting: bool = False, what: str = "KV policy") -> EvictionPolicy:
    """The registered policy ``name`` (``evicting``: it must evict); otherwise a one-line error
    that names ``what`` was asked for and lists the choices."""
    policy = _REGISTERED.get(name)
    if policy is None or (evicting and not policy.evicts):
        choices = ", ".join(available_policies(evicting=evicting))
        raise KVPError(f"unknown {what} '{name}' (choose from {choices})")
    return policy


def describe_policies(*, evicting: bool = False) -> str:
    """The registered policies, one line each with its summary (a command's --help)."""
    names = available_policies(evicting=evicting)
    width = max((len(n) for n in names), default=0)
    return "\n".join(f"  {n.ljust(width)}  {_REGISTERED[n].summary}" for n in names)
