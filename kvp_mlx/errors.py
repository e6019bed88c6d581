"""The one exception type the CLI turns into a one-line message."""


class KVPError(Exception):
    """A user-facing problem (bad path, mismatched models, corrupt file, bad input)."""
