"""The runtime and the lab stay apart: kvp_mlx imports neither the lab (bench/) nor the tests nor
its own test support (kvp_mlx.testing); the lab imports only kvp_mlx's public API; kvp_mlx's
modules import each other without a cycle. Every import counts: module level, inside functions,
and under ``if TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvp_mlx

REPO = Path(__file__).resolve().parent.parent


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import statement in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def sources(root: Path, package: str) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def runtime_modules(root: Path = REPO) -> dict[str, Path]:
    return sources(root, "kvp_mlx")


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Edges between the given modules: ``from pkg import sub`` counts as an import of ``pkg.sub``."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names, _ in imports_of(path, name):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != name:
                    graph[name].add(candidate)
                    if candidate != target:
                        break
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def forbidden_runtime_imports(modules: dict[str, Path]) -> list[str]:
    """kvp_mlx importing the lab, the tests or its test support."""
    bad = []
    for name, path in modules.items():
        if name == "kvp_mlx.testing":
            continue
        for target, names, line in imports_of(path, name):
            targets = [target] + [f"{target}.{n}" for n in names]
            if any(t.split(".")[0] in ("bench", "tests") or t == "kvp_mlx.testing" for t in targets):
                bad.append(f"{name}:{line} imports {target}{' (' + ', '.join(names) + ')' if names else ''}")
    return bad


def private_lab_imports(lab: dict[str, Path], public: tuple[str, ...]) -> list[str]:
    """Lab imports of kvp_mlx modules outside the declared public API, or of private names."""
    bad = []
    for name, path in lab.items():
        for target, names, line in imports_of(path, name):
            if target.split(".")[0] != "kvp_mlx":
                continue
            where = f"{path.name}:{line}"
            if target in public:
                bad += [f"{where} imports the private name {target}.{n}" for n in names
                        if n.startswith("_") or (target == "kvp_mlx" and n not in kvp_mlx.__all__
                                                 and f"kvp_mlx.{n}" not in public)]
            elif target == "kvp_mlx" or not names or all(f"{target}.{n}" not in public for n in names):
                bad.append(f"{where} imports {target}, not part of kvp_mlx's public API")
    return bad


def test_runtime_imports_neither_the_lab_nor_test_support():
    assert forbidden_runtime_imports(runtime_modules()) == []


def test_lab_imports_only_the_public_api():
    assert private_lab_imports(sources(REPO, "bench"), kvp_mlx.PUBLIC_MODULES) == []


def test_runtime_has_no_import_cycle():
    assert find_cycle(import_graph(runtime_modules())) is None


def test_public_modules_exist():
    modules = runtime_modules()
    assert set(kvp_mlx.PUBLIC_MODULES) <= set(modules), set(kvp_mlx.PUBLIC_MODULES) - set(modules)


# --- each check fails on a planted violation -------------------------------------------------------


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("line", ["from bench.ttft import main", "import tests.conftest",
                                  "from kvp_mlx import testing", "from kvp_mlx.testing import tiny_config"])
def test_planted_runtime_import_of_lab_or_test_support_is_caught(tmp_path, line):
    root = _plant(tmp_path, {"kvp_mlx/__init__.py": "", "kvp_mlx/a.py": f"def f():\n    {line}\n",
                             "kvp_mlx/testing.py": ""})
    (found,) = forbidden_runtime_imports(runtime_modules(root))
    assert found.startswith("kvp_mlx.a:2 imports")


@pytest.mark.parametrize("line", ["from kvp_mlx._blas import blas_threads", "from kvp_mlx.generation import _responses",
                                  "from kvp_mlx.cli import main", "import kvp_mlx.cli",
                                  "from kvp_mlx import cli"])
def test_planted_private_lab_import_is_caught(tmp_path, line):
    root = _plant(tmp_path, {"bench/__init__.py": "", "bench/x.py": f"{line}\n"})
    assert len(private_lab_imports(sources(root, "bench"), kvp_mlx.PUBLIC_MODULES)) == 1


def test_public_lab_imports_pass(tmp_path):
    root = _plant(tmp_path, {"bench/__init__.py": "", "bench/x.py": (
        "import kvp_mlx\nfrom kvp_mlx import Session, load\nfrom kvp_mlx.methods import get_method\n"
        "from kvp_mlx import methods\n")})
    assert private_lab_imports(sources(root, "bench"), kvp_mlx.PUBLIC_MODULES) == []


@pytest.mark.parametrize("how", ["module", "function", "type_checking"])
def test_planted_import_cycle_is_caught(tmp_path, how):
    back = {"module": "from kvp_mlx import a\n",
            "function": "def g():\n    from kvp_mlx.a import f\n",
            "type_checking": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kvp_mlx.a import f\n"}[how]
    root = _plant(tmp_path, {"kvp_mlx/__init__.py": "", "kvp_mlx/a.py": "from kvp_mlx.b import g\n",
                             "kvp_mlx/b.py": back, "kvp_mlx/c.py": "from kvp_mlx import a\n"})
    assert find_cycle(import_graph(runtime_modules(root))) == ["kvp_mlx.a", "kvp_mlx.b", "kvp_mlx.a"]
