"""A readable file over the byte chunks the Docker API streams, so ``tarfile`` can
read an archive while it arrives, without a copy on disk."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any


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
