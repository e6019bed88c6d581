"""What a bounded memory offers a :class:`~kvp_mlx.conversation.session.Session` (EpiCache's
:class:`~kvp_mlx.epicache.memory.BoundedMemory` and its baselines implement it).

The session asks, the memory answers: before a turn the memory picks the cache the turn runs on
(and may make room in it), the session then runs the turn on :attr:`TurnMemory.cache`; after the
turn the memory records what was said; between turns it compresses. The memory never writes the
session's fields: the session reads the memory's cache and installs it itself.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence


class TurnMemory(Protocol):
    caches: list[list]  # every cache the memory keeps (one per episode), each a list of layer caches

    @property
    def cache(self) -> list:
        """The cache the next turn runs on."""
        ...

    def before_turn(self, history: Sequence[int], prompt: Any, ids: Sequence[int], fill_to: int,
                    reserve: int) -> int:
        """Before a turn fills ``ids[:fill_to]`` (``history`` + the new message) and then adds up to
        ``reserve`` positions: choose :attr:`cache` and make room in it. Returns the positions that
        cache held before the turn (what the turn reuses)."""
        ...

    def after_turn(self, prompt: Any, reply: Sequence[int] | None) -> None:
        """After a turn: what was said (the message and the reply's tokens)."""
        ...

    def compress(self, history: Sequence[int], should_stop: Callable[[], bool] | None = None) -> Any:
        """Idle-time work between turns on a conversation of ``history``; stops when ``should_stop()``."""
        ...

    def reset(self) -> None:
        """Forget the conversation."""
        ...

    def tail(self, cache: list) -> int:
        """Positions of ``cache`` appended since its last compression (the ones a trim may drop)."""
        ...

    def held(self, cache: list) -> int:
        """Positions ``cache`` holds."""
        ...

    def snapshot(self) -> Any:
        """Everything a turn or a compression may change (caches and state), cheaply (no cache data
        is copied), for :meth:`restore` when the operation does not finish."""
        ...

    def restore(self, snapshot: Any) -> None:
        """The memory as it was at ``snapshot`` (each snapshot is restored at most once)."""
        ...
