"""Compression of the archive as it streams, on every core.

The archive is cut into blocks of a few megabytes and each block becomes a gzip member
of its own, compressed on a thread pool (zlib lets go of the interpreter lock while it
works). Concatenated gzip members are one valid gzip stream, which ``docker load``
reads like any other. Output keeps the input's order.

Compression pays only while the link is slower than the compressor. With the codec
``auto`` each block's level is chosen as the stream goes: compressed or stored (level 0:
a gzip member that costs a copy and a checksum), whichever has lately moved more of the
image per second (``LevelChoice``). So a slow link gets gzip's savings and a fast one is
not held back.
"""

from __future__ import annotations

import collections
import os
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

BLOCK_BYTES = 4 << 20
_PASS_THROUGH_BYTES = 1 << 20
STORED = 0  # a gzip member without compression


def _gzip_member(data: bytes, level: int) -> bytes:
    # wbits 31: a gzip container, which docker load recognises by its magic bytes.
    packer = zlib.compressobj(level, zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


class LevelChoice:
    """The level of each next block: whichever of ``level`` and STORED has been moving
    more of the image per second.

    Each cycle tries ``probe`` blocks at ``level``, then ``probe`` stored, then gives
    the next ``hold`` blocks to the faster of the two; the compressor credits each
    block with the seconds the sender waited for it and then spent on it. So the choice
    follows whatever binds (the link, the compressor, the source) without knowing which.
    Fixed at ``level`` unless ``adaptive``.

    The probes and the hold are cycles of their own, numbered by ``cycle``. A block
    counts only toward the cycle it was planned in: with blocks in flight, a hold's
    blocks are still reaching the sender while the next probes are planned, and their
    credits must not be taken for the probes'.
    """

    def __init__(self, level: int, adaptive: bool, probe: int = 8, hold: int = 32) -> None:
        self.level = level
        self.adaptive = adaptive
        self.probe, self.hold = probe, hold
        self.cycle = 0
        self._plan: list[int] = []
        self._holding = False  # the plan is a hold, not probes
        self._moved: dict[int, list[float]] = {}  # level -> [image bytes, seconds]
        self.blocks = collections.Counter()

    def credit(self, level: int, raw_bytes: int, seconds: float, cycle: int) -> None:
        """A block of ``raw_bytes`` at ``level``, planned in ``cycle``, took ``seconds``
        to reach the sender. Ignored once that cycle is over."""
        if cycle != self.cycle:
            return
        moved = self._moved.setdefault(level, [0.0, 0.0])
        moved[0] += raw_bytes
        moved[1] += seconds

    def rate(self, level: int) -> float:
        moved, seconds = self._moved.get(level, (0.0, 0.0))
        return moved / seconds if seconds > 0 else 0.0

    def next(self) -> tuple[int, int]:
        """The next block's level and the cycle it belongs to (to pass to ``credit``)."""
        if not self.adaptive:
            level = self.level
        else:
            if not self._plan:
                self._plan = self._next_cycle()
            level = self._plan.pop()
        self.blocks[level] += 1
        return level, self.cycle

    def _next_cycle(self) -> list[int]:
        """Blocks in reverse order: the probes, or the faster level's hold. Each cycle
        measures afresh, so what the hold moved does not outweigh the next probes."""
        probes = [STORED] * self.probe + [self.level] * self.probe
        tried = self.level in self._moved and STORED in self._moved
        if not self._holding and not tried:
            return probes  # the probes' blocks are still on their way: the cycle goes on
        best = STORED if self.rate(STORED) > self.rate(self.level) else self.level
        self._holding = not self._holding
        self.cycle += 1
        self._moved.clear()
        return [best] * self.hold if self._holding else probes


class BlockCompressor:
    """Feed bytes in, take compressed chunks out; ``finish`` flushes the rest.

    ``codec`` "gzip" compresses blocks of ``block_bytes`` at ``level`` on ``workers``
    threads (default: one per core); "auto" is gzip with the level chosen per block
    (``LevelChoice``); "none" passes the bytes through in chunks of about a megabyte.
    ``clock`` times the blocks for that choice.
    """

    def __init__(self, codec: str, level: int = 1, workers: int | None = None,
                 block_bytes: int = BLOCK_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._block_bytes = block_bytes
        self._clock = clock
        self._gzip = codec in ("gzip", "auto")
        self.levels = LevelChoice(level, adaptive=codec == "auto")
        self._workers = max(1, workers or os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self._workers) if self._gzip else None
        # (future of the gzip member, its level, its cycle, its raw size), in the
        # input's order
        self._pending: collections.deque[tuple[Future[bytes], int, int, int]] = (
            collections.deque())
        self._handed_any = False
        self._buffer = bytearray()
        self.raw_bytes = 0
        self.wire_bytes = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        self.raw_bytes += len(data)
        self._buffer += data
        limit = self._block_bytes if self._gzip else _PASS_THROUGH_BYTES
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
        level, cycle = self.levels.next()
        self._pending.append((self._pool.submit(_gzip_member, block, level), level, cycle,
                              len(block)))

    def _ready(self, wait: bool) -> Iterator[bytes]:
        """Hand out finished blocks in order; block while too many are in flight."""
        while self._pending and (wait or self._pending[0][0].done()
                                 or len(self._pending) > 2 * self._workers):
            head, level, cycle, size = self._pending.popleft()
            began = self._clock()
            chunk = head.result()
            waited = self._clock() - began
            self.wire_bytes += len(chunk)
            began = self._clock()
            yield chunk  # the sender has it until it asks for more
            # A block costs the wait for its compression and the sender's time on it.
            # The first block's wait is the pipeline filling, not a pace.
            if self._handed_any:
                self.levels.credit(level, size, waited + self._clock() - began, cycle)
            self._handed_any = True
