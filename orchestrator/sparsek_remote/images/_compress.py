"""Compression of the archive as it streams, on every core.

The archive is cut into blocks of a few megabytes and each block becomes a gzip member
of its own, compressed on a thread pool (zlib lets go of the interpreter lock while it
works). Concatenated gzip members are one valid gzip stream, which ``docker load``
reads like any other. Output keeps the input's order.

Compression pays only while the link is slower than the compressor. With ``adaptive``
each block's level is chosen as the stream goes: when the sender had to wait for a
block still being compressed, the next few blocks are stored (level 0: a gzip member
that costs a copy and a checksum); once finished blocks wait for the sender again, they
are compressed again. So a slow link gets gzip's savings and a fast one is not held back.
"""

from __future__ import annotations

import collections
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

BLOCK_BYTES = 4 << 20
_PASS_THROUGH_BYTES = 1 << 20
STORED = 0  # a gzip member without compression


def _gzip_member(data: bytes, level: int) -> bytes:
    # wbits 31: a gzip container, which docker load recognises by its magic bytes.
    packer = zlib.compressobj(level, zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


class LevelChoice:
    """The level of each next block: ``level`` while the compressor keeps ahead of the
    sender; after the sender had to wait for it, STORED for the next ``hold`` blocks
    (a single block compressed in time says little while the CPU is the bottleneck).
    Fixed at ``level`` unless ``adaptive``."""

    def __init__(self, level: int, adaptive: bool, hold: int = 8) -> None:
        self.level = level
        self.adaptive = adaptive
        self.hold = hold
        self._store_left = 0
        self.blocks = collections.Counter()

    def observe(self, sender_waited: bool) -> None:
        """What a hand-over saw: whether the sender waited for a block."""
        if sender_waited:
            self._store_left = self.hold

    def next(self) -> int:
        level = STORED if self.adaptive and self._store_left > 0 else self.level
        self._store_left = max(self._store_left - 1, 0)
        self.blocks[level] += 1
        return level


class BlockCompressor:
    """Feed bytes in, take compressed chunks out; ``finish`` flushes the rest.

    ``codec`` "gzip" compresses at ``level`` on ``workers`` threads (default: one per
    core); "auto" is gzip with the level chosen per block (``LevelChoice``); "none"
    passes the bytes through in chunks of about a megabyte.
    """

    def __init__(self, codec: str, level: int = 1, workers: int | None = None) -> None:
        self._gzip = codec in ("gzip", "auto")
        self.levels = LevelChoice(level, adaptive=codec == "auto")
        self._workers = max(1, workers or os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self._workers) if self._gzip else None
        self._pending: collections.deque[Future[bytes]] = collections.deque()
        self._buffer = bytearray()
        self.raw_bytes = 0
        self.wire_bytes = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        self.raw_bytes += len(data)
        self._buffer += data
        limit = BLOCK_BYTES if self._gzip else _PASS_THROUGH_BYTES
        if len(self._buffer) >= limit:
            yield from self._emit_block()
        yield from self._ready(wait=False)

    def finish(self) -> Iterator[bytes]:
        if self._buffer:
            yield from self._emit_block()
        yield from self._ready(wait=True)
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _emit_block(self) -> Iterator[bytes]:
        block = bytes(self._buffer)
        self._buffer.clear()
        if self._pool is None:
            self.wire_bytes += len(block)
            yield block
            return
        self._pending.append(self._pool.submit(_gzip_member, block, self.levels.next()))

    def _ready(self, wait: bool) -> Iterator[bytes]:
        """Hand out finished blocks in order; block while too many are in flight."""
        while self._pending and (wait or self._pending[0].done()
                                 or len(self._pending) > 2 * self._workers):
            head = self._pending.popleft()
            # Waiting for the first block (the pipeline filling) or for the last ones
            # (finish) says nothing of the compressor's pace against the link's.
            if not wait and self.wire_bytes > 0:
                self.levels.observe(sender_waited=not head.done())
            chunk = head.result()
            self.wire_bytes += len(chunk)
            yield chunk
