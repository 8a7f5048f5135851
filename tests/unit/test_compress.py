"""The ship's block compressor: whatever the codec and however the input is cut, the
output is the input (as one gzip stream where it compresses), and ``auto`` stores
blocks only while the sender is waiting for the compressor."""

from __future__ import annotations

import gzip
import os
import time

import pytest

from sparsek_remote.images._compress import BLOCK_BYTES, STORED, BlockCompressor, LevelChoice


def sample(size: int) -> bytes:
    """Random letters from an alphabet of 16: every block compresses to about 60%."""
    return os.urandom(size).translate(bytes(97 + b % 16 for b in range(256)))


def drain(sink: BlockCompressor, data: bytes, piece: int,
          link_bytes_per_s: float | None = None) -> bytes:
    """Everything the sink hands out, taken by a sender that is instant or, with
    ``link_bytes_per_s``, busy for as long as a link of that rate takes."""
    out = []

    def take(chunks) -> None:
        for chunk in chunks:
            out.append(chunk)
            if link_bytes_per_s:
                time.sleep(len(chunk) / link_bytes_per_s)

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


def test_the_level_is_the_one_that_moved_more_per_second() -> None:
    fixed = LevelChoice(1, adaptive=False)
    fixed.credit(STORED, 100, 0.1)
    assert [fixed.next() for _ in range(20)] == [1] * 20
    auto = LevelChoice(1, adaptive=True, probe=2, hold=3)
    assert [auto.next() for _ in range(4)] == [1, 1, STORED, STORED]  # the probes
    auto.credit(1, 200, 2.0)
    auto.credit(STORED, 200, 1.0)  # stored moved twice as much a second
    assert [auto.next() for _ in range(3)] == [STORED] * 3
    auto.credit(STORED, 6000, 1.0)  # the hold's blocks: fast, but not the next probe's
    assert [auto.next() for _ in range(4)] == [1, 1, STORED, STORED]  # probes again
    auto.credit(1, 300, 1.0)
    auto.credit(STORED, 300, 3.0)  # now the link is the slower part
    assert [auto.next() for _ in range(3)] == [1] * 3
    assert auto.blocks == {1: 7, STORED: 7}


SMALL = 256 << 10  # blocks of the two tests below, so that they take seconds


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
    # time (0.16 against 0.26 s), and compressing the next one takes a few milliseconds
    # meanwhile, so even a machine busy with other work keeps compressing.
    data = sample(12 * SMALL)
    sink = BlockCompressor("auto", workers=2, block_bytes=SMALL)
    sink.levels = LevelChoice(1, adaptive=True, probe=2, hold=32)  # decide early
    wire = drain(sink, data, SMALL // 4, link_bytes_per_s=1e6)
    assert gzip.decompress(wire) == data
    assert sink.levels.blocks[1] >= 8
    assert len(wire) < 0.8 * len(data)
