"""Conversations: a :class:`Session` keeps its caches turn after turn (``session``), the interface a
bounded memory implements for it (``turn_memory``), saved sessions (``session_file``) and the chat
REPL (``chat``).

Import order, lowest first: ``turn_memory`` and ``session`` (what a bounded memory such as
:mod:`kvp_mlx.epicache.memory` builds on), then ``session_file`` and ``chat`` (which know the
memories they save and offer); so this package exports only the first two.
"""

from kvp_mlx.conversation.session import RepairReport, Session, TurnStats, clip_spans
from kvp_mlx.conversation.turn_memory import TurnMemory

__all__ = ["RepairReport", "Session", "TurnMemory", "TurnStats", "clip_spans"]
