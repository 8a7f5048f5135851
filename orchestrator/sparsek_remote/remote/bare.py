"""Bare hosts (a rented container with no Docker): the runner in a virtualenv.

The project's wheels are sent to the host and installed into ``<remote_dir>/venv``,
made with ``--system-site-packages`` so the host's own PyTorch (the CUDA build that
matches its driver) is used. A marker in the venv names the wheels installed, so
an unchanged tree costs one command on the next run, the one that also finds the home
folder (``installed_tag``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sparsek_remote.errors import RemoteError
from sparsek_remote.remote.commands import sh_argv
from sparsek_remote.remote.connection import Connection
from sparsek_remote.remote.transfer import upload_bytes, upload_files

MARKER_NAME = ".sparsek-wheels"
INSTALL_TIMEOUT_S = 900.0
# What the runner imports besides its own packages; torch has a hint of its own.
_PROBE = ("import importlib.util, sys\n"
          "missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]\n"
          "print(' '.join(missing))\n")
_RUNNER_NEEDS = ("pydantic", "yaml", "torch", "sparsek", "sparsek_remote")
# The home folder, then the venv's marker if there is one ($1: remote_dir, relative to
# the home folder; $2: the marker's name).
_HOME_AND_TAG = 'printf "%s\\n" "$HOME"; cat "$HOME/$1/venv/$2" 2>/dev/null || true'


@dataclass(frozen=True)
class BareEnv:
    """A host's virtualenv: its interpreter and the wheels it holds."""

    python: str
    wheels_tag: str
    installed_now: bool


def wheels_tag(wheels: Sequence[Path]) -> str:
    """A digest of the wheels' names and contents: what the marker records."""
    digest = hashlib.sha256()
    for path in sorted(wheels, key=lambda p: p.name):
        digest.update(path.name.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def installed_tag(conn: Connection) -> str | None:
    """The wheels tag the host's venv is marked with (None: no venv, or not marked).
    The same round trip tells the connection the home folder."""
    result = conn.run(sh_argv(_HOME_AND_TAG, conn.host.remote_dir, MARKER_NAME),
                      what="looking for the runner's virtualenv")
    home, _, tag = result.text.partition("\n")
    conn.learn_home(home)
    return tag.strip() or None


def install(conn: Connection, remote_dir: str, wheels: Sequence[Path], *,
            installed: str | None, base_python: str = "python3") -> BareEnv:
    """Make sure ``<remote_dir>/venv`` holds exactly these wheels; returns its python.

    ``remote_dir`` is absolute on the host; ``installed`` is what ``installed_tag``
    read. ``wheels`` are the project's wheels and any dependency wheels to carry (for
    hosts without a package index); a torch wheel among them is installed only if the
    host has no torch."""
    if not wheels:
        raise RemoteError("no wheels to install on a bare host",
                          hint="build them with `pip wheel --no-deps . -w DIR`")
    tag = wheels_tag(wheels)
    venv = f"{remote_dir}/venv"
    python = f"{venv}/bin/python"
    if installed == tag:
        return BareEnv(python, tag, installed_now=False)
    folder = f"{remote_dir}/wheels/{tag}"
    upload_files(conn, list(wheels), folder, what="sending the wheels",
                 limit=INSTALL_TIMEOUT_S)
    _make_venv(conn, venv, base_python)
    _pip(conn, python, ["--no-deps", "--force-reinstall",
                        *_paths(folder, _own_wheels(wheels))], what="installing the wheels")
    _complete(conn, python, folder, wheels)
    upload_bytes(conn, (tag + "\n").encode("ascii"), f"{venv}/{MARKER_NAME}",
                 what="marking the venv")
    conn.run(["rm", "-rf", folder], what="removing the sent wheels", check=False)
    return BareEnv(python, tag, installed_now=True)


def _own_wheels(wheels: Sequence[Path]) -> list[Path]:
    own = [w for w in wheels if w.name.startswith(("sparsek_remote-", "sparsek-"))]
    return own or list(wheels)


def _paths(folder: str, wheels: Sequence[Path]) -> list[str]:
    return [f"{folder}/{w.name}" for w in wheels]


def _make_venv(conn: Connection, venv: str, base_python: str) -> None:
    if conn.run(["test", "-x", f"{venv}/bin/python"], what="looking for the venv",
                check=False).ok:
        return
    # With the host's pip visible through its site-packages, skip copying pip in.
    has_pip = conn.run([base_python, "-m", "pip", "--version"], what="looking for pip",
                       check=False).ok
    argv = [base_python, "-m", "venv", "--system-site-packages", venv]
    result = conn.run([*argv, "--without-pip"] if has_pip else argv,
                      what="making the venv", limit=INSTALL_TIMEOUT_S, check=False)
    if not result.ok:
        raise conn.failure("making the venv", result, hint=(
            f"the host needs {base_python} with its venv module (on Debian or Ubuntu: "
            "apt-get install python3-venv)"))


def _pip(conn: Connection, python: str, args: list[str], *, what: str,
         index: bool = False) -> None:
    argv = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            *([] if index else ["--no-index"]), *args]
    result = conn.run(argv, what=what, limit=INSTALL_TIMEOUT_S, check=False)
    if not result.ok:
        raise conn.failure(what, result, hint="the last lines above say which package "
                           "could not be installed")


def _missing(conn: Connection, python: str) -> list[str]:
    result = conn.run([python, "-c", _PROBE, *_RUNNER_NEEDS],
                      what="checking the runner's imports", limit=120)
    return result.text.split()


def _complete(conn: Connection, python: str, folder: str, wheels: Sequence[Path]) -> None:
    """Fill in what the runner imports and the host lacks: from the sent wheels first,
    then from the package index; torch only from a sent wheel."""
    missing = _missing(conn, python)
    if not missing:
        return
    if "torch" in missing:
        torch_wheels = [w for w in wheels if w.name.startswith("torch-")]
        if not torch_wheels:
            raise RemoteError(
                f"host {conn.alias!r} has no PyTorch for the runner (its python sees none)",
                hint="install the CUDA build of torch on the host (pip install torch), or "
                     "carry a torch wheel with the project's wheels")
        _pip(conn, python, _paths(folder, torch_wheels), what="installing torch")
    own = _paths(folder, _own_wheels(wheels))
    try:
        _pip(conn, python, ["--find-links", folder, *own], what="installing dependencies")
    except RemoteError:
        _pip(conn, python, ["--find-links", folder, *own],
             what="installing dependencies from the package index", index=True)
    still = _missing(conn, python)
    if still:
        raise RemoteError(f"host {conn.alias!r}: the runner still cannot import "
                          f"{', '.join(still)} after installing",
                          hint="carry wheels for these with the project's wheels")
