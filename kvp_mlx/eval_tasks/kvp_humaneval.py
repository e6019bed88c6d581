"""HumanEval scoring for the bundled tasks: each completed program runs with its tests in its own
Python subprocess (a timeout, an empty temporary working directory). lm-eval runs these metrics
only after its explicit confirmation (the tasks declare ``unsafe_code: true``)."""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile

TIMEOUT_S = 10.0


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """The problem's prompt followed by each completion: the program to test."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def passes(program: str, test: str, timeout: float = TIMEOUT_S) -> bool:
    """Whether ``program`` followed by ``test`` (which ends with ``check(entry_point)``) exits cleanly."""
    with tempfile.TemporaryDirectory() as cwd:
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", program + "\n\n" + test], cwd=cwd,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _pass_at(references: list[str], predictions: list[list[str]], k: int) -> float:
    values = []
    for test, programs in zip(references, predictions):
        n = len(programs)
        if n < k:
            raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
        c = sum(passes(p, test) for p in programs)
        values.append(pass_at_k_estimate(n, c, k))
    return sum(values) / len(values)


def pass_at_1(references: list[str], predictions: list[list[str]], **kwargs) -> float:
    return _pass_at(references, predictions, 1)


def pass_at_10(references: list[str], predictions: list[list[str]], **kwargs) -> float:
    return _pass_at(references, predictions, 10)
