"""What git tracks: source, the bundled model and small fixtures; never checkpoints or exports."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BYTES = 2_000_000
# The only places a large file belongs: the bundled model and the official fixtures the tests hold us to.
ALLOWED = ("hnet_core/demo_model/", "tests/fixtures/")


def tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout (git ls-files failed)")
    return [p for p in done.stdout.decode().split("\0") if p]


def oversized(paths: list[str], size_of) -> list[str]:
    """The paths outside ALLOWED whose size is over MAX_BYTES (a path deleted in the work tree is skipped)."""
    found = []
    for path in paths:
        if path.startswith(ALLOWED):
            continue
        size = size_of(path)
        if size is not None and size > MAX_BYTES:
            found.append(f"{path} ({size / 1e6:.1f} MB)")
    return found


def _size(path: str) -> int | None:
    full = os.path.join(ROOT, path)
    return os.path.getsize(full) if os.path.isfile(full) else None


def test_no_tracked_file_over_2_mb_outside_the_bundled_model_and_fixtures():
    big = oversized(tracked_files(), _size)
    assert not big, ("checkpoints and exports are build products, not source; keep them out of git: "
                     + ", ".join(big))


def test_size_rule_flags_a_large_file_anywhere_but_the_allowed_folders():
    sizes = {"bench/quality/resume/model.safetensors": 20_000_000, "hnet_core/demo_model/model.safetensors": 10_000_000,
             "tests/fixtures/official/x.npz": 3_000_000, "README.md": 30_000, "gone.bin": None}
    assert oversized(list(sizes), sizes.get) == ["bench/quality/resume/model.safetensors (20.0 MB)"]
