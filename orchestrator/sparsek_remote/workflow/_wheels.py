"""The project's wheels for bare hosts: built from the checkout into a cache keyed by
a digest of the sources, so an unchanged tree is built once; built from a copy, so
the checkout gets no build output."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from sparsek_remote.errors import ConfigError

_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "orchestrator", "kernels")


class WheelCache:
    """The project's wheels for bare hosts, built once per source tree (thread-safe)."""

    def __init__(self, project_root: Path, cache_root: Path,
                 given: Path | None = None) -> None:
        self.project_root, self.cache_root, self.given = project_root, cache_root, given
        self._lock = threading.Lock()
        self._wheels: list[Path] | None = None

    def __call__(self) -> list[Path]:
        with self._lock:
            if self._wheels is None:
                self._wheels = (_given_wheels(self.given) if self.given is not None
                                else build_wheels(self.project_root, self.cache_root))
            return self._wheels


def _given_wheels(folder: Path) -> list[Path]:
    wheels = sorted(folder.glob("*.whl"))
    if not any(w.name.startswith("sparsek_remote-") for w in wheels):
        raise ConfigError(f"{folder} holds no sparsek_remote wheel",
                          hint="build it with `pip wheel --no-deps . -w DIR`")
    return wheels


def build_wheels(project_root: Path, cache_root: Path) -> list[Path]:
    """Build the project's wheel into ``cache_root/<digest of the sources>/`` (reused
    while the sources are unchanged), from a copy so the tree gets no build output."""
    project_root = _checkout(Path(project_root))
    target = Path(cache_root) / _sources_digest(project_root)
    existing = sorted(target.glob("*.whl"))
    if existing:
        return existing
    with tempfile.TemporaryDirectory(prefix="sparsek-wheel-") as tmp:
        source = Path(tmp) / "src"
        _copy_sources(project_root, source)
        out = Path(tmp) / "wheels"
        _pip_wheel(source, out)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(out, target)
        except OSError:
            if not any(target.glob("*.whl")):  # another process won the race: fine
                raise
    return sorted(target.glob("*.whl"))


def _checkout(project_root: Path) -> Path:
    """The folder to build from: ``project_root``, else the checkout this package
    was installed from (an editable install), when either is the project's."""
    here = Path(__file__).resolve().parents[3]
    for candidate in (project_root, here):
        if (candidate / "pyproject.toml").is_file() and (
                candidate / "orchestrator" / "sparsek_remote").is_dir():
            return candidate
    raise ConfigError(f"{project_root} is not the project's checkout, and this package was "
                      "not installed from one", hint="bare hosts get wheels built from the "
                      "checkout: run from it, or pass --wheels DIR")


def _sources_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _source_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for name in _SOURCES:
        path = root / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in
                      p.parts and not p.name.endswith(".pyc") and ".egg-info" not in str(p)]
    return sorted(files)


def _copy_sources(root: Path, dest: Path) -> None:
    for path in _source_files(root):
        target = dest / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def _pip_wheel(source: Path, out: Path) -> None:
    base = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(source),
            "-w", str(out)]
    # Without isolation when the installed setuptools can build it (fast, offline);
    # else pip fetches the build requirements itself.
    for argv in ([*base, "--no-build-isolation"], base):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if result.returncode == 0 and any(out.glob("*.whl")):
            return
    raise ConfigError("building the project's wheel failed:\n"
                      + "\n".join(result.stderr.strip().splitlines()[-15:]),
                      hint="check that `pip wheel --no-deps .` works in the checkout")
