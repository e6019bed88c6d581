"""The one exception type the CLI turns into a one-line message, and the wrapper that does it."""

from __future__ import annotations

import sys
from typing import Callable


class KVPError(Exception):
    """A user-facing problem (bad path, mismatched models, corrupt file, bad input)."""


def exit_status(command: Callable[[], int | None]) -> int:
    """``command()``'s exit status, with a :class:`KVPError` reported as one ``error:`` line on
    standard error (status 1) and Ctrl-C as ``interrupted`` (status 130), without a traceback."""
    try:
        return int(command() or 0)
    except KVPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
