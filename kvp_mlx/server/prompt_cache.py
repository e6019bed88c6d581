"""Sessions kept across requests, keyed by their tokens: the nearest prefix wins, least recently used
goes first.

mlx-lm's ``LRUPromptCache`` keeps plain cache lists; a request here needs a whole
:class:`kvp_mlx.conversation.session.Session` (the base cache, the auxiliary's lagging cache, which positions hold
predicted K/V, a repair in progress), and idle repair walks the sessions from the most recently
used. So this is its own small LRU with the same rules: the cached session sharing the longest
prefix with a request is reused; one whose tokens are all a prefix of the request is handed over
(the request extends it and puts it back); one that goes beyond the common prefix is forked at it
(:meth:`Session.fork`), so a session is never changed under another request. A session whose cache
cannot be trimmed (a hybrid's or state-space model's recurrent states, sliding-window layers) is
reused only by a request that extends its whole history. Limits by count and by bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from mlx_lm.models.cache import can_trim_prompt_cache

from kvp_mlx.conversation.session import Session


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def session_nbytes(session: Session) -> int:
    """Bytes of a session's caches (base and auxiliary)."""
    caches = session.caches
    if caches is None:
        return 0
    layers = list(caches.cache) + list(caches.draft_cache or [])
    return sum(int(c.nbytes) for c in layers if not c.empty())


@dataclass
class _Entry:
    session: Session
    nbytes: int


class SessionCache:
    """At most ``max_size`` sessions and ``max_bytes`` bytes of caches; one per distinct history.

    Used from the server's worker thread only (MLX runs in one thread).
    """

    def __init__(self, max_size: int = 10, max_bytes: int = 1 << 63) -> None:
        if max_size < 0 or max_bytes < 0:
            raise ValueError("cache limits must be non-negative")
        self.max_size, self.max_bytes = max_size, max_bytes
        self._entries: list[_Entry] = []  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def fetch(self, method: str, tokens: list[int]) -> tuple[Session | None, int]:
        """The session to serve ``tokens`` with ``method`` (the caller owns it) and how many leading
        tokens it holds; ``(None, 0)`` when nothing cached shares a prefix."""
        best, best_len = None, 0
        for entry in self._entries:
            session = entry.session
            if session.method != method:
                continue
            n = common_prefix(session.tokens, tokens)
            trimmable = can_trim_prompt_cache(session.caches.cache)  # type: ignore[union-attr]
            # handed over whole: the request must add a token, unless the cache can step back one
            # (a hybrid's recurrent states cannot: such a session is reused only when extended)
            movable = n == len(session.tokens) and (n < len(tokens) or trimmable)
            if n == 0 or not (movable or trimmable):
                continue
            # longer prefix first; on a tie, one handed over whole, then the most recent
            if best is None or n > best_len or (n == best_len and movable):
                best, best_len = entry, n
        if best is None:
            return None, 0
        if best_len == len(best.session.tokens):
            self._entries.remove(best)
            return best.session, best_len
        return best.session.fork(best_len), best_len

    def insert(self, session: Session) -> None:
        """Keep ``session`` as the most recently used; drop cached sessions it makes redundant (its
        trimmable prefixes, as mlx-lm does) and the least recently used beyond the limits."""
        if not session.tokens:
            return
        keep = []
        for entry in self._entries:
            other = entry.session
            redundant = (other.method == session.method and len(other.tokens) <= len(session.tokens)
                         and session.tokens[: len(other.tokens)] == other.tokens
                         and can_trim_prompt_cache(session.caches.cache))  # type: ignore[union-attr]
            if not redundant and other is not session:
                keep.append(entry)
        keep.append(_Entry(session, session_nbytes(session)))
        self._entries = keep
        self._evict()

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self.max_size or self.nbytes > self.max_bytes):
            self._entries.pop(0)

    def refresh(self, session: Session) -> None:
        """Recount a session's bytes after it changed in place (a repair)."""
        for entry in self._entries:
            if entry.session is session:
                entry.nbytes = session_nbytes(session)
        self._evict()

    def most_recent_first(self) -> Iterator[Session]:
        return iter([e.session for e in reversed(self._entries)])

    def clear(self) -> None:
        self._entries = []
