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

Replies: a client resends a conversation with each reply as the text it received, which the chat
template re-tokenizes into other ids than those generated (a reply's leading-space piece comes back
without its space, merges differ), so a plain token prefix would end at the previous prompt. Each
cached session remembers the replies it generated here (their token span and the text sent), and
:meth:`SessionCache.align` puts a remembered reply's own ids back in place of the re-tokenized ones
wherever the request's text there is that reply's text (at token boundaries), so the request reuses
the whole conversation and continues exactly as the session continuing its own tokens would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Reply:
    """A reply a session generated: its tokens ``session.tokens[start:end]`` (no end-of-sequence
    token) were sent to the client as ``text``."""

    start: int
    end: int
    text: str


@dataclass
class _Entry:
    session: Session
    nbytes: int
    replies: list[Reply] = field(default_factory=list)


def _text_at(tokenizer, ids: list[int], start: int, end: int) -> str:
    """The text of ``ids[start:end]`` in context: decoded after the token before it, that token's
    text removed (a piece's leading space decodes as it does mid-sequence)."""
    if start == 0:
        return tokenizer.decode(ids[:end])
    return tokenizer.decode(ids[start - 1 : end])[len(tokenizer.decode(ids[start - 1 : start])):]


def reply_of(tokenizer, tokens: list[int], start: int, text: str) -> Reply | None:
    """The :class:`Reply` of ``tokens[start:]`` sent as ``text``, or None when those tokens do not
    stream to that text (reasoning or a stop string taken out): a trailing end-of-sequence token is
    left out; the text is what mlx-lm's streaming detokenizer gives them (which drops a first
    piece's leading space and shows incomplete bytes as U+FFFD)."""
    end = len(tokens)
    while end > start and tokens[end - 1] in getattr(tokenizer, "eos_token_ids", ()):
        end -= 1
    if end <= start or not text:
        return None
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokens[start:end]:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return Reply(start, end, text) if detokenizer.text == text else None


def _find_text(tokenizer, ids: list[int], start: int, text: str) -> int | None:
    """The last token boundary ``m`` where ``ids[start:m]`` gives exactly ``text`` (in context; the
    last, so a character's trailing bytes stay with it), or None."""
    limit, found = len(text) + 8, None
    for m in range(start + 1, len(ids) + 1):
        got = _text_at(tokenizer, ids, start, m)
        if got == text:
            found = m
            continue
        settled = got.rstrip("\ufffd")  # a piece's bytes may end inside a character
        if found is not None or len(got) > limit or not text.startswith(settled):
            break
    return found


class SessionCache:
    """At most ``max_size`` sessions and ``max_bytes`` bytes of caches; one per distinct history.

    Used from the server's worker thread only (MLX runs in one thread).
    """

    def __init__(self, max_size: int = 10, max_bytes: int = 1 << 63) -> None:
        if max_size < 0 or max_bytes < 0:
            raise ValueError("cache limits must be non-negative")
        self.max_size, self.max_bytes = max_size, max_bytes
        self._entries: list[_Entry] = []  # least recently used first
        self._handed: tuple[Session, list[Reply]] | None = None  # the session fetch gave out, its replies

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
        self._handed = None
        if best is None:
            return None, 0
        if best_len == len(best.session.tokens):
            self._entries.remove(best)
            self._handed = (best.session, best.replies)
            return best.session, best_len
        fork = best.session.fork(best_len)
        self._handed = (fork, [r for r in best.replies if r.end <= best_len])
        return fork, best_len

    def align(self, method: str, tokens: list[int]) -> list[int]:
        """``tokens`` with each resent reply a cached session of ``method`` generated put back as its
        own token ids: where the request shares that session's tokens up to a remembered reply and
        its text from there on is the reply's text, ending at a token boundary. Unchanged when no
        reply matches."""
        best, best_len = tokens, 0
        for entry in self._entries:
            if entry.session.method != method or not entry.replies:
                continue
            got = self._aligned(entry, tokens)
            n = common_prefix(entry.session.tokens, got)
            if got is not tokens and n > best_len:
                best, best_len = got, n
        return best

    @staticmethod
    def _aligned(entry: _Entry, tokens: list[int]) -> list[int]:
        held, tokenizer = entry.session.tokens, entry.session.model.tokenizer
        for reply in entry.replies:
            n = common_prefix(held, tokens)
            if n >= reply.end:
                continue
            if n < reply.start:
                break
            m = _find_text(tokenizer, tokens, reply.start, reply.text)
            if m is None:
                break
            tokens = tokens[: reply.start] + held[reply.start : reply.end] + tokens[m:]
        return tokens

    def insert(self, session: Session, reply: tuple[int, str] | None = None) -> None:
        """Keep ``session`` as the most recently used; drop cached sessions it makes redundant (its
        trimmable prefixes, as mlx-lm does) and the least recently used beyond the limits.
        ``reply``: ``(start, text)``, the session's tokens from ``start`` on were generated here and
        sent as ``text`` (remembered for :meth:`align`, with the replies it had when fetched)."""
        replies: list[Reply] = []
        if self._handed is not None and self._handed[0] is session:
            replies = [r for r in self._handed[1] if r.end <= len(session.tokens)]
        self._handed = None
        if reply is not None:
            got = reply_of(session.model.tokenizer, session.tokens, reply[0], reply[1])
            if got is not None:
                replies = [r for r in replies if r.end <= got.start] + [got]
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
        keep.append(_Entry(session, session_nbytes(session), replies))
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
