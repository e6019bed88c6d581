"""Building the package: setuptools warns about no folder it would leave out of the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


REPO = Path(__file__).parent.parent


def _setuptools_is_recent() -> bool:
    """pyproject.toml needs setuptools >= 77; an older one in this environment means an isolated build."""
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


def test_wheel_builds_without_package_would_be_ignored_warnings(tmp_path):
    # build a copy: an in-tree build would write build/ and *.egg-info into the checkout
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "models"))
    isolation = ["--no-build-isolation"] if _setuptools_is_recent() else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-v", *isolation, "-w", str(tmp_path / "wheels")],
        capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "running bdist_wheel" in output  # -v shows setuptools' own output, where the warning would be
    assert "Package would be ignored" not in output, output
    (wheel,) = (tmp_path / "wheels").glob("kvp_mlx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("kvp_mlx/cli.py", "kvp_mlx/convert/cli.py", "kvp_mlx/epicache/loaders.py",
                 "kvp_mlx/default_model/kvp_config.json", "kvp_mlx/default_model/base/model.safetensors",
                 "kvp_mlx/default_model/aux/tokenizer.json"):
        assert name in names, name
    # the runtime alone: no lab (bench/) and no tests, inside kvp_mlx/ or beside it
    top = {n.split("/")[0] for n in names if not n.startswith("kvp_mlx-")}
    assert top == {"kvp_mlx"}, top
    assert not any(n.startswith("kvp_mlx/bench/") for n in names)
    # every module of the runtime is in it (a subpackage left out would fail only at import)
    modules = {str(p.relative_to(REPO)) for p in (REPO / "kvp_mlx").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
