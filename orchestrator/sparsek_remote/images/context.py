"""What goes into the image, and the content hash that names it.

The build context is assembled from a fixed list of inputs (the Dockerfile, the lock,
the packaging files and the two source packages), never from the whole tree, so the
hash covers exactly what the build can see. The hash ignores caches and timestamps:
an unchanged tree gives the same tag on any machine, and the tag is how an unchanged
tree is neither rebuilt nor re-shipped.
"""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sparsek_remote.errors import ImageError

IMAGE_REPOSITORY = "sparsek-remote"
DOCKERFILE = "docker/Dockerfile"
LOCK_FILE = "docker/requirements.lock"
CA_MEMBER = "docker/ca/ca.pem"
WHEELS_DIR = "docker/wheels"
HASH_LABEL = "io.sparsek.content-hash"
DEFAULT_BUILDER_IMAGE = "nvidia/cuda:13.0.1-devel-ubuntu24.04"
DEFAULT_RUNTIME_IMAGE = "nvidia/cuda:13.0.1-runtime-ubuntu24.04"
DEFAULT_TORCH_INDEX_URL = "https://download.pytorch.org/whl/cu130"
DEFAULT_TORCH_SPEC = "torch==2.13.0"

_TOP_FILES = (DOCKERFILE, LOCK_FILE, "pyproject.toml", "README.md", "LICENSE")
_SOURCE_DIRS = ("orchestrator/sparsek_remote", "kernels/sparsek")
_IGNORED_DIRS = frozenset({"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                           ".ipynb_checkpoints", "build", "dist"})
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp", "~", ".egg-info")
# Bumped when the way the hash is computed changes, so old tags are never reused.
_HASH_VERSION = "sparsek-image/1"
# Zip (the wheel format) cannot store dates before 1980; any fixed date keeps the
# context tar identical between builds.
_CONTEXT_MTIME = 946684800  # 2000-01-01T00:00:00Z


@dataclass(frozen=True)
class BuildOptions:
    """How to build: the bases, where PyTorch comes from, and what pip may need.

    ``wheel_dir`` holds wheels offered to pip before any index (an offline builder, or a
    CPU-only test build); they count in the hash. ``ca_bundle`` is the CA of a
    TLS-intercepting proxy; it changes how pip reaches the index, not what the image
    holds, so it does not count in the hash and never reaches the final image.
    """

    builder_image: str = DEFAULT_BUILDER_IMAGE
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    torch_index_url: str = DEFAULT_TORCH_INDEX_URL
    torch_spec: str = DEFAULT_TORCH_SPEC
    wheel_dir: Path | None = None
    ca_bundle: Path | None = None
    repository: str = IMAGE_REPOSITORY

    def build_args(self) -> dict[str, str]:
        return {"BUILDER_IMAGE": self.builder_image, "RUNTIME_IMAGE": self.runtime_image,
                "TORCH_INDEX_URL": self.torch_index_url, "TORCH_SPEC": self.torch_spec}


@dataclass(frozen=True)
class ContextFile:
    """One file of the build context: where it lies and its name inside the context."""

    arcname: str
    path: Path
    executable: bool = False


@dataclass(frozen=True)
class BuildContext:
    """Everything one build sees, and the hash of it."""

    root: Path
    options: BuildOptions
    files: tuple[ContextFile, ...]
    wheels: tuple[ContextFile, ...]
    content_hash: str
    build_args: Mapping[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.options.repository}:{self.content_hash[:20]}"


def collect_context(root: Path, options: BuildOptions | None = None) -> BuildContext:
    """Gather the inputs of a build under ``root`` (the project folder) and hash them."""
    options = options or BuildOptions()
    root = Path(root).resolve()
    files = tuple(_tree_files(root))
    wheels = tuple(_wheel_files(options.wheel_dir))
    if options.ca_bundle is not None and not Path(options.ca_bundle).is_file():
        raise ImageError(f"the CA bundle {options.ca_bundle} is not a file",
                         hint="pass the PEM file of the proxy's CA, or leave the option out")
    digest = _hash(files, wheels, options.build_args())
    return BuildContext(root, options, files, wheels, digest,
                        {**options.build_args(), "CONTENT_HASH": digest})


def write_context_tar(context: BuildContext, out: BinaryIO) -> None:
    """Write the build context as an uncompressed tar with fixed owners and dates."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("docker/ca", WHEELS_DIR):
            tar.addfile(_member(directory, tarfile.DIRTYPE, 0o755, 0))
        entries = list(context.files) + list(context.wheels)
        if context.options.ca_bundle is not None:
            entries.append(ContextFile(CA_MEMBER, Path(context.options.ca_bundle)))
        for entry in entries:
            size = entry.path.stat().st_size
            member = _member(entry.arcname, tarfile.REGTYPE,
                             0o755 if entry.executable else 0o644, size)
            with entry.path.open("rb") as handle:
                tar.addfile(member, handle)


def _member(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.mode, member.size, member.mtime = kind, mode, size, _CONTEXT_MTIME
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    return member


def _tree_files(root: Path) -> Iterator[ContextFile]:
    for name in _TOP_FILES:
        path = root / name
        if not path.is_file():
            raise ImageError(f"{path} is missing; the image cannot be built without it",
                             hint="run from the project folder (the one with pyproject.toml)")
        yield _context_file(root, path)
    for name in _SOURCE_DIRS:
        folder = root / name
        if not folder.is_dir():
            raise ImageError(f"{folder} is missing; the image cannot be built without it",
                             hint="run from the project folder (the one with pyproject.toml)")
        yield from (_context_file(root, p) for p in _walk(folder))


def _walk(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.iterdir()):
        if path.name in _IGNORED_DIRS or path.name.endswith(_IGNORED_SUFFIXES):
            continue
        if path.is_symlink():
            raise ImageError(f"{path} is a symbolic link; the image takes regular files only",
                             hint="replace the link with the file it points to")
        if path.is_dir():
            yield from _walk(path)
        elif path.is_file():
            yield path


def _context_file(root: Path, path: Path) -> ContextFile:
    mode = path.stat().st_mode
    return ContextFile(path.relative_to(root).as_posix(), path, bool(mode & stat.S_IXUSR))


def _wheel_files(wheel_dir: Path | None) -> Iterator[ContextFile]:
    if wheel_dir is None:
        return
    folder = Path(wheel_dir)
    if not folder.is_dir():
        raise ImageError(f"the wheel folder {folder} does not exist",
                         hint="pass a folder of .whl files, or leave the option out")
    for path in sorted(folder.glob("*.whl")):
        if path.is_file():
            yield ContextFile(f"{WHEELS_DIR}/{path.name}", path)


def _hash(files: tuple[ContextFile, ...], wheels: tuple[ContextFile, ...],
          build_args: Mapping[str, str]) -> str:
    lines = io.StringIO()
    lines.write(_HASH_VERSION + "\n")
    for entry in files + wheels:
        flag = "x" if entry.executable else "-"
        lines.write(f"file {entry.arcname} {flag} {_file_sha256(entry.path)}\n")
    for key in sorted(build_args):
        lines.write(f"arg {key}={build_args[key]}\n")
    return hashlib.sha256(lines.getvalue().encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
