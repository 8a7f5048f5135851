"""The ship's block compressor: whatever the codec and however the input is cut, the
output is the input (as one gzip stream where it compresses), and ``auto`` stores
blocks only while the sender is waiting for the compressor."""

from __future__ import annotations

import gzip
import os

import pytest

from sparsek_remote.images._compress import BLOCK_BYTES, STORED, BlockCompressor, LevelChoice


def sample(size: int) -> bytes:
    """Random letters from an alphabet of 16: every block compresses to about 60%."""
    return os.urandom(size).translate(bytes(97 + b % 16 for b in range(256)))


class Link:
    """A link of ``bytes_per_s`` with a clock of its own, which only sending moves: by
    each chunk's time on the wire. A compressor on this clock measures the link alone,
    however long compressing takes on the machine."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s = bytes_per_s
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def send(self, chunk: bytes) -> None:
        self.now += len(chunk) / self.bytes_per_s


def drain(sink: BlockCompressor, data: bytes, piece: int, link: Link | None = None) -> bytes:
    """Everything the sink hands out, taken by a sender that is instant or, with
    ``link``, sends each chunk over it."""
    out = []

    def take(chunks) -> None:
        for chunk in chunks:
            out.append(chunk)
            if link is not None:
                link.send(chunk)

    for start in range(0, len(data), piece):
        take(sink.feed(data[start:start + piece]))
    take(sink.finish())
    return b"".join(out)


@pytest.mark.parametrize("codec", ["auto", "gzip", "none"])
@pytest.mark.parametrize("piece", [1, 4093, 1 << 20])
def test_the_stream_is_the_input_whatever_the_codec_and_cuts(codec: str, piece: int) -> None:
    data = sample(3 * BLOCK_BYTES + 12345 if piece > 1 else 70_000)
    sink = BlockCompressor(codec, workers=2)
    wire = drain(sink, data, piece)
    assert (wire if codec == "none" else gzip.decompress(wire)) == data
    assert sink.raw_bytes == len(data)
    assert sink.wire_bytes == len(wire)


def plan(choice: LevelChoice, blocks: int) -> tuple[list[int], int]:
    """The levels of the next ``blocks`` blocks, and the one cycle they belong to."""
    levels, cycles = zip(*(choice.next() for _ in range(blocks)))
    assert len(set(cycles)) == 1
    return list(levels), cycles[0]


def test_the_level_is_the_one_that_moved_more_per_second() -> None:
    fixed = LevelChoice(1, adaptive=False)
    fixed.credit(STORED, 100, 0.1, fixed.cycle)
    assert plan(fixed, 20)[0] == [1] * 20
    auto = LevelChoice(1, adaptive=True, probe=2, hold=3)
    probes, cycle = plan(auto, 4)
    assert probes == [1, 1, STORED, STORED]
    auto.credit(1, 200, 2.0, cycle)
    auto.credit(STORED, 200, 1.0, cycle)  # stored moved twice as much a second
    hold, cycle = plan(auto, 3)
    assert hold == [STORED] * 3
    auto.credit(STORED, 6000, 1.0, cycle)  # the hold's blocks: fast, but not the probes'
    probes, cycle = plan(auto, 4)
    assert probes == [1, 1, STORED, STORED]  # probes again
    auto.credit(1, 300, 1.0, cycle)
    auto.credit(STORED, 300, 3.0, cycle)  # now the link is the slower part
    assert plan(auto, 3)[0] == [1] * 3
    assert auto.blocks == {1: 7, STORED: 7}


def test_a_block_credited_after_its_cycle_counts_for_nothing() -> None:
    # Blocks are still in flight when the next cycle is planned: a hold's stored block
    # that reaches the sender only once the next probes are planned must not make
    # stored look fast to them, nor a probe's block that does so during the hold.
    auto = LevelChoice(1, adaptive=True, probe=2, hold=3)
    _, probing = plan(auto, 4)
    auto.credit(1, 200, 2.0, probing)
    auto.credit(STORED, 200, 1.0, probing)
    _, holding = plan(auto, 3)
    assert holding != probing
    auto.credit(STORED, 400, 1.0, probing)  # a probe's block, late
    assert auto.rate(STORED) == 0.0
    probes, cycle = plan(auto, 4)
    assert probes == [1, 1, STORED, STORED]
    auto.credit(STORED, 6000, 1.0, holding)  # a hold's block, late
    assert auto.rate(STORED) == 0.0
    auto.credit(1, 300, 1.0, cycle)
    auto.credit(STORED, 300, 3.0, cycle)  # stored: 100 bytes a second, not 1575
    assert plan(auto, 3)[0] == [1] * 3


SMALL = 256 << 10  # blocks of the two tests below


def test_auto_stores_blocks_when_the_compressor_holds_the_sender_back() -> None:
    # One thread at zlib's slowest level against a sender that takes every chunk at
    # once: stored blocks move faster, so after the probes the blocks go out stored.
    data = sample(12 * SMALL)
    sink = BlockCompressor("auto", level=9, workers=1, block_bytes=SMALL)
    sink.levels = LevelChoice(9, adaptive=True, probe=2, hold=32)  # decide early
    assert gzip.decompress(drain(sink, data, SMALL // 4)) == data
    assert sink.levels.blocks[STORED] >= 8


def test_auto_compresses_for_a_slow_link() -> None:
    # 1 MB/s: a compressed block reaches the far end in about 60% of a stored one's
    # time (0.16 against 0.26 s). On the link's clock compressing takes no time, so the
    # outcome does not hang on how busy the machine is. At worst the first probes are
    # all in flight when they run out and are tried again: 8 blocks of 12 compressed.
    data = sample(12 * SMALL)
    link = Link(1e6)
    sink = BlockCompressor("auto", workers=2, block_bytes=SMALL, clock=link.clock)
    sink.levels = LevelChoice(1, adaptive=True, probe=2, hold=32)  # decide early
    wire = drain(sink, data, SMALL // 4, link)
    assert gzip.decompress(wire) == data
    assert sink.levels.blocks[1] >= 8
    assert len(wire) < 0.8 * len(data)
