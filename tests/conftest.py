"""Shared fixtures: the project root and a clean working folder per test."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Installs, first on PATH, a stand-in for nvidia-smi, which machines without a GPU
    lack: it answers the GPU query with the listing given (nvidia-smi's CSV, no header)
    and any other query with a driver version; with ``old_driver`` it refuses
    compute_cap, as drivers before 510 do. CUDA_VISIBLE_DEVICES is unset. Returns the
    file where each call's arguments are noted."""

    def install(listing: str, *, old_driver: bool = False) -> Path:
        tools = tmp_path / "fake-nvidia-smi"
        tools.mkdir()
        (tools / "listing.csv").write_text(listing, encoding="utf-8")
        refuse = ("*compute_cap*) echo 'Field \"compute_cap\" is not a valid field to "
                  "query.'; exit 2;;\n" if old_driver else "")
        smi = tools / "nvidia-smi"
        smi.write_text(f'#!/bin/sh\necho "$@" >> "{tools}/calls"\ncase "$1" in\n{refuse}'
                       f'  *index*) cat "{tools}/listing.csv";;\n  *) echo 580.65.06;;\n'
                       "esac\n", encoding="utf-8")
        smi.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        return tools / "calls"

    return install


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh current directory with no .env, so `results/` and `.sparsek/` land here."""
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
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
