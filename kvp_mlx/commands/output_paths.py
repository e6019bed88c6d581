"""Output paths checked before any work: a command that would fail to write its results at the end
says so in one line at the start."""

from __future__ import annotations

from pathlib import Path

from kvp_mlx.errors import KVPError


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` can be written as a file: it is not a directory, and no existing parent is a file."""
    path = Path(path)
    if path.is_dir():
        raise KVPError(f"{flag} {path} is a directory, not a file")
    _check_parents(path, flag)
    return path


def check_output_dir(path: str | Path, flag: str, files: tuple[str, ...] = ()) -> Path:
    """``path`` can be a directory (it is not a file, nor under one) holding ``files``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KVPError(f"{flag} {path} is a file, not a directory")
    _check_parents(path, flag)
    for name in files:
        if (path / name).is_dir():
            raise KVPError(f"{flag} {path}: {path / name} is a directory, not a file")
    return path


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise KVPError(f"{flag} {path}: {parent} is a file, not a directory")
            return
