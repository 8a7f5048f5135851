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
    """Half random, half text: some blocks compress, some do not."""
    text = b"layer.tar of the sparsek image, compressible line\n" * (size // 100)
    return (os.urandom(size // 2) + text)[:size]


def drain(sink: BlockCompressor, data: bytes, piece: int, pause_s: float = 0.0) -> bytes:
    out = []

    def take(chunks) -> None:
        for chunk in chunks:
            out.append(chunk)
            time.sleep(pause_s)  # a sender busy on a slow link

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


def test_the_level_follows_who_waits() -> None:
    fixed = LevelChoice(1, adaptive=False)
    fixed.observe(sender_waited=True)
    assert fixed.next() == 1
    auto = LevelChoice(1, adaptive=True, hold=3)
    assert auto.next() == 1  # nothing seen yet: compress
    auto.observe(sender_waited=True)
    auto.observe(sender_waited=False)  # one block in time does not end the hold
    assert [auto.next(), auto.next()] == [STORED, STORED]
    auto.observe(sender_waited=True)  # another wait starts it again
    assert [auto.next() for _ in range(4)] == [STORED, STORED, STORED, 1]
    assert auto.blocks == {1: 2, STORED: 5}


def test_auto_stores_blocks_when_the_compressor_holds_the_sender_back() -> None:
    # One thread at zlib's slowest level against a sender that takes every chunk at
    # once: the sender waits, so blocks go out stored, and the stream stays valid.
    data = sample(8 * BLOCK_BYTES)
    sink = BlockCompressor("auto", level=9, workers=1)
    assert gzip.decompress(drain(sink, data, 1 << 20)) == data
    assert sink.levels.blocks[STORED] > 0


def test_auto_compresses_every_block_for_a_slow_sender() -> None:
    data = sample(6 * BLOCK_BYTES)
    sink = BlockCompressor("auto", workers=2)
    wire = drain(sink, data, 1 << 20, pause_s=0.5)
    assert gzip.decompress(wire) == data
    assert sink.levels.blocks[STORED] == 0
    assert len(wire) < 0.8 * len(data)  # the text half compressed
