"""The image's layers, and a ``docker save`` archive without the layers a host holds.

``docker load`` takes a layer from its own store, without reading the archive's copy,
when it already holds that layer on the same chain of parents (verified on Docker
20.10.24: an archive whose manifest names a held layer whose folder is absent loads
and gives the same image ID; an absent layer the daemon does not hold fails the load).
So the archive streamed to a host keeps ``manifest.json``, the image configuration and
every layer the host lacks, and leaves the held layers' files out.

Two save formats exist: Docker < 25 writes ``<v1 id>/layer.tar`` folders whose names
say nothing about the layer, so which folder is which layer is learnt once per image
from the archive's own manifest (``scan_layout``); Docker >= 25 writes an OCI layout
whose layer blobs are named by their diff ID (``blobs/sha256/<hex>``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import docker
from sparsek_remote.errors import ImageError
from sparsek_remote.images._compress import BlockCompressor
from sparsek_remote.images._stream import ChunkReader
from sparsek_remote.images.build import ImageInfo, docker_errors

Codec = Literal["gzip", "none"]
SaveFormat = Literal["legacy", "oci"]
CODECS: tuple[Codec, ...] = ("gzip", "none")
# docker load recognises gzip by itself; zstd it only reads from Docker 23 on
# (20.10 answers "archive/tar: invalid tar header"), so gzip is the portable choice.
LOAD_ARGV = ("docker", "load")
_CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
_OCI_MIN_API = (1, 44)  # Docker 25.0, the first to save an OCI layout


def chain_ids(diff_ids: Sequence[str]) -> tuple[str, ...]:
    """The chain ID of each layer [n_layers]: the identity of a layer *on its parents*,
    which is what a daemon's layer store is keyed by."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
            continue
        digest = hashlib.sha256(f"{chain[-1]} {diff_id}".encode("ascii")).hexdigest()
        chain.append(f"sha256:{digest}")
    return tuple(chain)


@dataclass(frozen=True)
class HostImages:
    """What a host's daemon holds: the image ID under our tag (None if absent) and the
    chain IDs of every layer of every image it has."""

    image_id: str | None
    held_chain_ids: frozenset[str]

    def held_mask(self, image: ImageInfo) -> tuple[bool, ...]:
        """Per layer of ``image`` [n_layers]: True if the host already holds it."""
        return tuple(c in self.held_chain_ids for c in chain_ids(image.diff_ids))


# Prints ``image <id>`` if the host has the tag given as $1, otherwise one
# ``layers [...]`` line per image it holds. Exit 97: docker is not usable there.
HOST_QUERY_SCRIPT = """
docker version --format '{{.Server.Version}}' >/dev/null || exit 97
if id=$(docker image inspect --format '{{.Id}}' "$1" 2>/dev/null); then
  echo "image $id"
  exit 0
fi
docker image ls -aq --no-trunc | sort -u \\
  | xargs -r docker image inspect --format 'layers {{json .RootFS.Layers}}'
"""
DOCKER_UNUSABLE_EXIT = 97


def image_id_argv(tag: str) -> list[str]:
    """The command that prints the ID of ``tag`` on a host (to verify a load)."""
    return ["docker", "image", "inspect", "--format", "{{.Id}}", tag]


def parse_host_query(output: str) -> HostImages:
    """Read what ``HOST_QUERY_SCRIPT`` printed; lines that do not parse are ignored."""
    image_id: str | None = None
    held: set[str] = set()
    for line in output.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind == "image" and rest.startswith("sha256:"):
            image_id = rest.strip()
        elif kind == "layers":
            held.update(chain_ids(_diff_id_list(rest)))
    return HostImages(image_id, frozenset(held))


def _diff_id_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return []
    return [v for v in value if v.startswith("sha256:")]


@dataclass(frozen=True)
class ArchiveLayout:
    """Where each layer of an image lies in its save archive [n_layers], base first."""

    format: SaveFormat
    layer_paths: tuple[str, ...]

    def dropped_units(self, image: ImageInfo, held: Sequence[bool]) -> frozenset[str]:
        """Archive entries (a folder or a blob) that may be left out for a host that
        holds the layers marked in ``held``. A layer whose content also appears at a
        position the host lacks stays, because the archive stores such twins once
        (a blob, or a link to the first folder) and the kept one must find it."""
        needed = {d for d, h in zip(image.diff_ids, held, strict=True) if not h}
        return frozenset(self._unit(path) for path, diff_id, h in
                         zip(self.layer_paths, image.diff_ids, held, strict=True)
                         if h and diff_id not in needed)

    def _unit(self, path: str) -> str:
        return posixpath.dirname(path) if self.format == "legacy" else path

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "layer_paths": list(self.layer_paths)})

    @classmethod
    def from_json(cls, text: str) -> ArchiveLayout:
        data = json.loads(text)
        return cls(data["format"], tuple(data["layer_paths"]))


def archive_layout(client: docker.DockerClient, image: ImageInfo, ref: str, *,
                   cache_dir: Path | None = None) -> ArchiveLayout:
    """The layout of ``ref``'s save archive: known from the daemon's version for the OCI
    format; for the older format learnt by reading one full save (kept in ``cache_dir``
    per image ID, so it is read once per image)."""
    if _daemon_api(client) >= _OCI_MIN_API:
        return ArchiveLayout("oci", tuple(f"blobs/sha256/{d.split(':', 1)[1]}"
                                          for d in image.diff_ids))
    cached = cache_dir / f"{image.image_id.split(':', 1)[-1]}.layout.json" if cache_dir else None
    if cached is not None and cached.is_file():
        return ArchiveLayout.from_json(cached.read_text(encoding="utf-8"))
    layout = scan_layout(client, image, ref)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(layout.to_json(), encoding="utf-8")
    return layout


def scan_layout(client: docker.DockerClient, image: ImageInfo, ref: str) -> ArchiveLayout:
    """Read ``ref``'s save archive once, skipping the data, to learn its layout."""
    with docker_errors(f"reading the saved archive of {ref}"), _SavedArchive(client, ref) as tar:
        for member in tar:
            if member.name.startswith("blobs/"):
                return ArchiveLayout("oci", tuple(
                    f"blobs/sha256/{d.split(':', 1)[1]}" for d in image.diff_ids))
            if member.name == "manifest.json":
                return _legacy_layout(tar, member, image, ref)
    raise ImageError(f"the saved archive of {ref} has no manifest.json",
                     hint="the daemon's save format is not one this version knows")


def _legacy_layout(tar: tarfile.TarFile, member: tarfile.TarInfo, image: ImageInfo,
                   ref: str) -> ArchiveLayout:
    handle = tar.extractfile(member)
    manifest = json.loads(handle.read()) if handle else []
    entries = [m for m in manifest if image.image_id.split(":", 1)[1] in str(m.get("Config"))]
    paths = tuple(entries[0].get("Layers") or ()) if entries else ()
    if len(paths) != len(image.diff_ids):
        raise ImageError(f"the saved archive of {ref} lists {len(paths)} layers, the image "
                         f"has {len(image.diff_ids)}", hint="rebuild the image and retry")
    return ArchiveLayout("legacy", paths)


def _daemon_api(client: docker.DockerClient) -> tuple[int, ...]:
    with docker_errors("asking the Docker daemon for its version"):
        version = str(client.version().get("ApiVersion", "0"))
    return tuple(int(p) for p in version.split(".") if p.isdigit())


class _SavedArchive:
    """``docker save`` of one image as a tar read as it streams from the daemon."""

    def __init__(self, client: docker.DockerClient, ref: str) -> None:
        self._chunks = client.api.get_image(ref, chunk_size=_CHUNK)

    def __enter__(self) -> tarfile.TarFile:
        self._tar = tarfile.open(fileobj=ChunkReader(self._chunks), mode="r|", bufsize=_CHUNK)
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


@dataclass(frozen=True)
class ArchiveStats:
    """What one partial archive carried: layers sent and held, bytes before and after
    compression."""

    layers_total: int
    layers_sent: int
    tar_bytes: int
    wire_bytes: int
    seconds: float

    @property
    def layers_held(self) -> int:
        return self.layers_total - self.layers_sent


class PartialArchive:
    """Iterating yields the compressed ``docker save`` archive of ``ref`` without the
    layers the host holds, as it streams from the daemon: neither side keeps a full
    copy. ``stats`` is set once the iteration has finished."""

    def __init__(self, client: docker.DockerClient, image: ImageInfo, ref: str,
                 host: HostImages, layout: ArchiveLayout, *, codec: Codec = "gzip",
                 level: int = 1, workers: int | None = None) -> None:
        if codec not in CODECS:
            raise ImageError(f"unknown compression {codec!r}", hint=f"use one of {CODECS}")
        self._client, self._image, self._ref, self._layout = client, image, ref, layout
        self._held = host.held_mask(image)
        self._dropped = layout.dropped_units(image, self._held)
        self._codec, self._level, self._workers = codec, level, workers
        self.stats: ArchiveStats | None = None

    def __iter__(self) -> Iterator[bytes]:
        started = time.monotonic()
        sink = BlockCompressor(self._codec, self._level, self._workers)
        try:
            yield from self._members(sink)
        finally:
            sink.close()
        sent = sum(1 for h in self._held if not h)
        self.stats = ArchiveStats(len(self._held), sent, sink.raw_bytes, sink.wire_bytes,
                                  time.monotonic() - started)

    def _members(self, sink: BlockCompressor) -> Iterator[bytes]:
        with docker_errors(f"saving {self._ref}"), _SavedArchive(self._client, self._ref) as tar:
            for member in tar:
                if self._is_dropped(member.name):
                    continue
                yield from sink.feed(member.tobuf(tarfile.PAX_FORMAT, "utf-8",
                                                  "surrogateescape"))
                if member.isreg():
                    yield from self._copy_data(tar, member, sink)
            yield from sink.feed(b"\0" * (2 * _BLOCK))
            yield from sink.finish()

    def write_to(self, out: BinaryIO) -> ArchiveStats:
        """Write the archive to a binary file object; return what it carried."""
        for chunk in self:
            out.write(chunk)
        return self._finished_stats()

    def _finished_stats(self) -> ArchiveStats:
        if self.stats is None:
            raise ImageError(f"the archive of {self._ref} was not read to its end")
        return self.stats

    def _is_dropped(self, name: str) -> bool:
        name = name.rstrip("/")
        return any(name == unit or name.startswith(unit + "/") for unit in self._dropped)

    def _copy_data(self, tar: tarfile.TarFile, member: tarfile.TarInfo,
                   sink: BlockCompressor) -> Iterator[bytes]:
        handle = tar.extractfile(member)
        remaining = member.size
        while remaining > 0 and handle is not None:
            data = handle.read(min(_CHUNK, remaining))
            if not data:
                raise ImageError(f"the saved archive of {self._ref} ended inside "
                                 f"{member.name}", hint="the daemon stopped; retry")
            remaining -= len(data)
            yield from sink.feed(data)
        padding = -member.size % _BLOCK
        if padding:
            yield from sink.feed(b"\0" * padding)
