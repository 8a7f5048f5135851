"""Shared fixtures: the project root and a clean working folder per test."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh current directory with no .env, so `results/` and `.sparsek/` land here."""
    monkeypatch.chdir(tmp_path)
    for key in list(__import__("os").environ):
        if key.startswith("SPARSEK_"):
            monkeypatch.delenv(key)
    (tmp_path / "results").mkdir()
    return tmp_path


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every path under root with the sha256 of its content (or a marker for folders)."""
    snap: dict[str, str] = {}
    if not root.exists():
        return snap
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            snap[rel] = "link:" + str(path.readlink())
        elif path.is_dir():
            snap[rel] = "dir"
        else:
            snap[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snap
