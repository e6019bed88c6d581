"""Training data: text files, directories or jsonl -> token sequences packed to a fixed length."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import mlx.core as mx
import numpy as np

from kvp_mlx.errors import KVPError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".js", ".ts", ".html", ".css", ".yaml", ".yml", ""}


def read_documents(paths: Sequence[str | Path], text_field: str = "text") -> list[tuple[str, str]]:
    """(name, text) for every document: a text file is one, a directory every text file below it
    (sorted), a ``.jsonl`` file one per line (its ``text_field``)."""
    docs: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise KVPError(f"training data not found: {path}")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.suffix == ".jsonl":
                docs += _read_jsonl(f, text_field)
            elif f.suffix in TEXT_SUFFIXES or f == path:
                try:
                    docs.append((str(f), f.read_text(encoding="utf-8")))
                except UnicodeDecodeError:
                    if f == path:
                        raise KVPError(f"{f} is not UTF-8 text") from None
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise KVPError(f"no text found in {', '.join(map(str, paths))}")
    return docs


def _read_jsonl(path: Path, field: str) -> list[tuple[str, str]]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise KVPError(f"{path}:{i + 1}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise KVPError(f"{path}:{i + 1}: no string field '{field}'")
        out.append((f"{path}:{i + 1}", record[field]))
    return out


def split_documents(
    docs: list[tuple[str, str]], heldout_fraction: float, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split by document (never inside one) with a fixed seed: (train, held-out)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = int(round(len(docs) * heldout_fraction))
    if heldout_fraction > 0 and len(docs) > 1:
        n_held = max(1, min(n_held, len(docs) - 1))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [docs[i] for i in train], [docs[i] for i in held]


def tokenize_documents(tokenizer: Any, docs: Iterable[tuple[str, str]]) -> np.ndarray:
    """One stream of ids: each document with the tokenizer's BOS (if it adds one), then EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for _, text in docs:
        ids += tokenizer.encode(text)
        if eos is not None:
            ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def pack(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of ``seq_len + 1`` ids (inputs and shifted targets): [N, seq_len + 1]."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise KVPError(f"not enough data for one sequence of {seq_len} tokens ({len(ids)} tokens)")
    return np.stack([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


@dataclass
class Batches:
    """Deterministic batches: step s always gets the same rows (so a resumed run continues exactly)."""

    sequences: np.ndarray  # [N, seq_len + 1]
    batch_size: int
    seed: int

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, step: int) -> mx.array:
        n = len(self.sequences)
        rows = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(k, n)
            perm = np.random.default_rng(self.seed + epoch).permutation(n)
            rows.append(perm[pos])
        return mx.array(self.sequences[rows])

    def in_order(self, max_batches: int | None = None) -> Iterable[mx.array]:
        """Every sequence once, in order (evaluation and calibration)."""
        count = 0
        for start in range(0, len(self.sequences), self.batch_size):
            if max_batches is not None and count >= max_batches:
                return
            count += 1
            yield mx.array(self.sequences[start : start + self.batch_size])


class BatchSource(Protocol):
    """What the training loop draws from: the batch of step ``step``, the same on every call."""

    def batch(self, step: int) -> mx.array: ...


@dataclass
class Curriculum:
    """``first``'s batches for the first ``switch_step`` steps, then ``then``'s (counted from 0 again),
    so that a resumed run continues exactly; the stages may differ in sequence length."""

    first: Batches
    then: Batches
    switch_step: int

    def batch(self, step: int) -> mx.array:
        return self.first.batch(step) if step < self.switch_step else self.then.batch(step - self.switch_step)
