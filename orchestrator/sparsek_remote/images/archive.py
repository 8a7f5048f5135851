"""The partial archive: ``docker save`` of the image rewritten as it streams, leaving
out what the host holds, compressed on the way. Neither side keeps a full copy."""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Literal

from sparsek_remote.errors import ImageError
from sparsek_remote.images._compress import STORED, BlockCompressor
from sparsek_remote.images._stream import CHUNK_BYTES, SavedArchive
from sparsek_remote.images.build import ImageInfo, docker_errors
from sparsek_remote.images.layers import ArchiveLayout, HostImages

if TYPE_CHECKING:  # docker itself is imported where a client is made (build.py)
    import docker

# auto: gzip, each block compressed or stored as the link needs (see _compress).
Codec = Literal["auto", "gzip", "none"]
CODECS: tuple[Codec, ...] = ("auto", "gzip", "none")
# docker load recognises gzip by itself; zstd it reads only from Docker 23 on
# (20.10 answers "archive/tar: invalid tar header"), so gzip is the portable choice.
LOAD_ARGV = ("docker", "load")
_BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class ArchiveStats:
    """What one partial archive carried: layers sent (of all), bytes before and after
    compression. ``unplaced_layers`` counts layer folders the layout did not name: more
    than one means the daemon's save format was not the predicted one (all were sent)."""

    layers_total: int
    layers_sent: int
    tar_bytes: int
    wire_bytes: int
    seconds: float
    unplaced_layers: int = 0
    stored_blocks: int = 0  # gzip blocks sent uncompressed (codec auto, a fast link)


class PartialArchive:
    """Iterating yields the compressed ``docker save`` archive of ``ref`` without the
    entries the host holds; ``stats`` is set once the iteration has finished.

    An entry the layout does not name is always sent: a wrong guess about the save
    format costs bytes, never a broken image.
    """

    def __init__(self, client: docker.DockerClient, image: ImageInfo, ref: str,
                 host: HostImages, layout: ArchiveLayout, *, codec: Codec = "auto",
                 level: int = 1, workers: int | None = None) -> None:
        if codec not in CODECS:
            raise ImageError(f"unknown compression {codec!r}", hint=f"use one of {CODECS}")
        self._client, self._ref, self._layout = client, ref, layout
        held = host.held_mask(image)
        self._dropped = layout.dropped_units(image, held)
        self._known = {u for u in layout.units if u is not None}
        self._codec, self._level, self._workers = codec, level, workers
        self._layers_total = len(held)
        self._layers_sent = 0
        self._unplaced: set[str] = set()
        self.stats: ArchiveStats | None = None

    def __iter__(self) -> Iterator[bytes]:
        started = time.monotonic()
        sink = BlockCompressor(self._codec, self._level, self._workers)
        try:
            yield from self._members(sink)
        finally:
            sink.close()
        self.stats = ArchiveStats(self._layers_total, self._layers_sent, sink.raw_bytes,
                                  sink.wire_bytes, time.monotonic() - started,
                                  len(self._unplaced), sink.levels.blocks[STORED])

    def write_to(self, out: BinaryIO) -> ArchiveStats:
        """Write the archive to a binary file object; return what it carried."""
        for chunk in self:
            out.write(chunk)
        if self.stats is None:
            raise ImageError(f"the archive of {self._ref} was not read to its end")
        return self.stats

    def _members(self, sink: BlockCompressor) -> Iterator[bytes]:
        with docker_errors(f"saving {self._ref}"), SavedArchive(self._client, self._ref) as tar:
            for member in tar:
                unit = self._layout.unit_of(member.name)
                if unit in self._dropped:
                    continue
                self._count(member, unit)
                yield from sink.feed(member.tobuf(tarfile.PAX_FORMAT, "utf-8",
                                                  "surrogateescape"))
                if member.isreg():
                    yield from self._copy_data(tar, member, sink)
            yield from sink.feed(b"\0" * (2 * _BLOCK))
            yield from sink.finish()

    def _count(self, member: tarfile.TarInfo, unit: str) -> None:
        if self._layout.is_layer_member(member.name) and member.isfile():
            self._layers_sent += 1
            if unit not in self._known:
                self._unplaced.add(unit)

    def _copy_data(self, tar: tarfile.TarFile, member: tarfile.TarInfo,
                   sink: BlockCompressor) -> Iterator[bytes]:
        handle = tar.extractfile(member)
        remaining = member.size
        while remaining > 0 and handle is not None:
            data = handle.read(min(CHUNK_BYTES, remaining))
            if not data:
                raise ImageError(f"the saved archive of {self._ref} ended inside "
                                 f"{member.name}", hint="the daemon stopped; retry")
            remaining -= len(data)
            yield from sink.feed(data)
        padding = -member.size % _BLOCK
        if padding:
            yield from sink.feed(b"\0" * padding)
