"""Extracting a fetched tar archive without letting it write anywhere it should not.

Every member is checked before the first byte is written, so a refused archive
leaves nothing behind, inside the destination or outside it. The standard
library's 'data' filter runs as a second line where this Python has it.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from sparsek_remote._bundle_checks import (
    CHUNK_BYTES,
    MAX_BUNDLE_BYTES,
    MAX_FILE_BYTES,
    MAX_FILES,
    path_problem,
    show,
)
from sparsek_remote.errors import BundleError


def extract(archive: Path | BinaryIO, dest: Path) -> list[str]:
    """Check every member, then extract regular files and folders into ``dest``
    (absent, or an empty folder). Returns the files' relative paths, sorted."""
    with _open_tar(archive) as tar:
        members = check_members(tar, dest)
        made_dest = _prepare_dest(dest)
        try:
            for name, member in members:
                _extract_member(tar, name, member, dest)
        except BaseException:
            _empty(dest, remove=made_dest)
            raise
    return sorted(name for name, member in members if member.isreg())


def check_members(tar: tarfile.TarFile, dest: Path) -> list[tuple[str, tarfile.TarInfo]]:
    """Every member of a fetched archive, checked before anything is extracted:
    (relative name, member) for regular files and folders; the archive's own root
    folder ('.' or './') is skipped. Refuses links, devices, pipes and odd names."""
    checked: dict[str, tarfile.TarInfo] = {}
    total = 0
    for member in tar:
        name = _member_name(member)
        if name is None:
            continue
        if name in checked:
            raise BundleError(f"the archive holds {show(name)} twice")
        checked[name] = member
        total += member.size
        if len(checked) > 2 * MAX_FILES or total > MAX_BUNDLE_BYTES:
            raise BundleError("the archive holds more files or bytes than a bundle may")
        _second_line(member, dest)
    _check_parents(checked)
    return list(checked.items())


def _member_name(member: tarfile.TarInfo) -> str | None:
    raw = member.name
    # `tar -C folder -c .` writes names like "./results.json" and a "." folder.
    if member.isdir() and raw in (".", "./"):
        return None
    name = raw[2:] if raw.startswith("./") else raw
    if member.isdir():
        name = name.rstrip("/")
    problem = "is absolute" if raw.startswith("/") else path_problem(name)
    if problem:
        raise BundleError(f"the archive member {show(raw)} {problem}")
    if not (member.isreg() or member.isdir()):
        raise BundleError(f"the archive member {show(raw)} is {_member_kind(member)}; "
                          "a bundle holds only regular files and folders")
    if member.size > MAX_FILE_BYTES:
        raise BundleError(f"the archive member {show(raw)} is larger than "
                          f"{MAX_FILE_BYTES // 2**30} GiB")
    return name


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.isdev():
        return "a device or named pipe"
    return "of an unsupported type"


def _second_line(member: tarfile.TarInfo, dest: Path) -> None:
    # The standard library's own 'data' filter, where this Python has it.
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:
        return
    try:
        data_filter(member, str(dest))
    except tarfile.TarError as exc:
        raise BundleError(f"the archive member {show(member.name)} is refused: {exc}") from None


def _check_parents(checked: dict[str, tarfile.TarInfo]) -> None:
    for name in checked:
        for parent in PurePosixPath(name).parents:
            owner = checked.get(str(parent))
            if owner is not None and not owner.isdir():
                raise BundleError(f"the archive member {show(name)} lies under "
                                  f"{show(str(parent))}, which is a file")


@contextlib.contextmanager
def _open_tar(archive: Path | BinaryIO) -> Iterator[tarfile.TarFile]:
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(archive, (str, os.PathLike)):
                tar = stack.enter_context(tarfile.open(archive, mode="r:*"))
            else:
                tar = stack.enter_context(tarfile.open(fileobj=_seekable(archive, stack),
                                                       mode="r:*"))
            yield tar
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BundleError(f"the archive cannot be read: {exc}") from None


def _seekable(stream: BinaryIO, stack: contextlib.ExitStack) -> BinaryIO:
    # Members are all checked before extraction, which needs a second pass.
    if stream.seekable():
        return stream
    spool = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (closed by stack)
    copied = 0
    while chunk := stream.read(CHUNK_BYTES):
        copied += len(chunk)
        if copied > MAX_BUNDLE_BYTES:
            raise BundleError("the archive is larger than a bundle may be")
        spool.write(chunk)
    spool.seek(0)
    return spool


def _prepare_dest(dest: Path) -> bool:
    """True if ``dest`` was created here; an existing one must be an empty folder."""
    if not os.path.lexists(dest):
        dest.mkdir(parents=True)
        return True
    if not stat.S_ISDIR(os.lstat(dest).st_mode) or any(dest.iterdir()):
        raise BundleError(f"the extraction folder {dest} must be absent or an empty folder")
    return False


def _extract_member(tar: tarfile.TarFile, name: str, member: tarfile.TarInfo,
                    dest: Path) -> None:
    target = dest.joinpath(*name.split("/"))
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    if source is None:
        raise BundleError(f"the archive member {show(name)} has no data")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with source, os.fdopen(os.open(target, flags, 0o644), "wb") as out:
        shutil.copyfileobj(source, out, CHUNK_BYTES)


def _empty(dest: Path, *, remove: bool) -> None:
    if remove:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
