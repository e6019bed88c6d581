"""`kvp-mlx epicache-profile`: a profile written beside the model or to --out (created when
missing), and bad --text / --out as one-line errors that write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvp_mlx.epicache.budgets import PROFILE_FILE

from test_bad_input import assert_one_line_error, run_cli

SMALL = ["--tokens", "64", "--block", "16", "--sink", "4"]


@pytest.fixture()
def pair_copy(random_pair_dir, tmp_path) -> Path:
    dst = tmp_path / "pair"
    shutil.copytree(random_pair_dir, dst)
    return dst


def test_profile_from_a_text_file_to_a_missing_out_directory(pair_copy, tmp_path):
    text = tmp_path / "history.txt"
    text.write_text("Alice said she moved to Oslo in May. Bob asked about the weather there.\n" * 20)
    out = tmp_path / "new" / "profiles"
    proc = run_cli("epicache-profile", "--model", str(pair_copy), "--text", str(text), "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr
    profile = json.loads((out / PROFILE_FILE).read_text())
    assert profile["text"] == str(text) and profile["tokens"] == 64
    assert len(profile["sensitivity"]) == 3  # one per base layer
    assert not (pair_copy / PROFILE_FILE).exists()


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_bad_text_is_one_line_and_writes_nothing(pair_copy, tmp_path, kind):
    text = {"missing": tmp_path / "no" / "such" / "file", "directory": tmp_path}.get(kind, tmp_path / "bin")
    if kind == "not-utf8":
        text.write_bytes(b"abc\xff\xfe")
    proc = run_cli("epicache-profile", "--model", str(pair_copy), "--text", str(text), *SMALL)
    reason = {"missing": "No such file or directory", "directory": "Is a directory", "not-utf8": "not valid UTF-8"}
    assert_one_line_error(proc, f"error: {text}", reason[kind])
    assert not (pair_copy / PROFILE_FILE).exists()


def test_out_that_is_a_file_is_one_line(pair_copy, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("x")
    assert_one_line_error(run_cli("epicache-profile", "--model", str(pair_copy), "--out", str(out), *SMALL),
                          "not a directory")
    assert out.read_text() == "x"
