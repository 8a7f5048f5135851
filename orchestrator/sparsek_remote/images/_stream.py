"""``docker save`` read as it streams from the daemon: a readable file over the API's
byte chunks, so ``tarfile`` reads the archive while it arrives, without a copy on disk."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # docker itself is imported where a client is made (build.py)
    import docker


CHUNK_BYTES = 1 << 20


class ChunkReader(io.RawIOBase):
    """A readable file over an iterable of byte chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._rest = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._rest = memoryview(chunk)
        size = min(len(buffer), len(self._rest))
        buffer[:size] = self._rest[:size]
        self._rest = self._rest[size:]
        return size


class SavedArchive:
    """``docker save`` of one image as a tar, entered as a ``tarfile`` read in stream mode."""

    def __init__(self, client: docker.DockerClient, ref: str) -> None:
        self._chunks = client.api.get_image(ref, chunk_size=CHUNK_BYTES)

    def __enter__(self) -> tarfile.TarFile:
        self._tar = tarfile.open(fileobj=ChunkReader(self._chunks), mode="r|",
                                 bufsize=CHUNK_BYTES)
        return self._tar

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self._tar.close()
        if kind is None:
            # Read the response to its end (a few padding blocks): the daemon keeps its
            # hold on the image's layers until the save's response is complete.
            for _chunk in self._chunks:
                pass
        close = getattr(self._chunks, "close", None)
        if close:
            close()
