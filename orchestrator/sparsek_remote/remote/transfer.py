"""Moving bytes to and from a host through SSH exec channels, as streams.

Uploads land under a temporary name and are renamed into place, so a reader on the
host never sees half a file. Tar streams are produced and consumed chunk by chunk:
no full temporary copy on either side.
"""

from __future__ import annotations

import os
import tarfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from sparsek_remote.remote.commands import sh_argv
from sparsek_remote.remote.connection import Connection

_WRITE_FILE = ('mkdir -p "$(dirname "$1")" && cat > "$1.partial" && '
               'mv -f "$1.partial" "$1"')
_UNPACK = 'mkdir -p "$1" && tar -xf - -C "$1"'


def upload_bytes(conn: Connection, data: bytes, remote_path: str, *, what: str) -> None:
    """Write ``data`` to ``remote_path`` (parents made; replaced atomically)."""
    conn.run(sh_argv(_WRITE_FILE, remote_path), stdin=data, what=what)


def upload_files(conn: Connection, files: Sequence[Path], remote_dir: str, *, what: str,
                 limit: float | None = None) -> None:
    """Send local files (by their base names) into ``remote_dir`` as one tar stream."""
    read_fd, write_fd = os.pipe()
    writer = _TarWriter(files, os.fdopen(write_fd, "wb"))
    writer.start()
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            conn.stream_in(sh_argv(_UNPACK, remote_dir), pipe, what=what, limit=limit)
    finally:
        writer.join()
    writer.raise_if_failed()


def download_tar(conn: Connection, remote_dir: str, sink: BinaryIO, *, what: str,
                 limit: float | None = None) -> None:
    """Stream ``remote_dir``'s content as a gzip-compressed tar into ``sink``."""
    conn.stream_out(["tar", "-C", remote_dir, "-czf", "-", "."], sink, what=what,
                    limit=limit)


class _TarWriter(threading.Thread):
    """Writes a tar of ``files`` into a pipe; the other end feeds the SSH channel."""

    def __init__(self, files: Sequence[Path], out: BinaryIO) -> None:
        super().__init__(daemon=True)
        self.files, self.out = list(files), out
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.out, tarfile.open(fileobj=self.out, mode="w|") as tar:
                for path in self.files:
                    tar.add(path, arcname=path.name, recursive=False)
        except BrokenPipeError:
            pass  # the remote side stopped reading; its own error tells why
        except BaseException as exc:  # re-raised in the caller's thread
            self.error = exc

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
