"""The image's layers: their identities, which of them a host holds, and where each lies
in a ``docker save`` archive.

``docker load`` takes a layer from its own store, without reading the archive's copy,
when it already holds that layer on the same chain of parents (verified on Docker
20.10.24: an archive whose manifest names a held layer whose folder is absent loads
and gives the same image ID; an absent layer the daemon does not hold fails the load).
So the archive streamed to a host may leave the held layers' files out.

Two save formats exist. Docker >= 25 writes an OCI layout whose layer blobs are named
by their diff ID (``blobs/sha256/<hex>``). Docker < 25 writes ``<v1 id>/layer.tar``
folders; the v1 ID of every layer but the top one depends only on the layer chain, so
it is computed here the way the daemon computes it (``legacy_layer_folders``), and the
one remaining folder is the top layer's. ``scan_layout`` reads a real archive to check.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sparsek_remote.errors import ImageError
from sparsek_remote.images._stream import SavedArchive
from sparsek_remote.images.build import ImageInfo, docker_errors

if TYPE_CHECKING:  # docker itself is imported where a client is made (build.py)
    import docker

SaveFormat = Literal["legacy", "oci"]
_OCI_MIN_API = (1, 44)  # Docker 25.0, the first to save an OCI layout
# The v1 configuration Docker < 25 writes for every layer but the top one: an empty
# container configuration created at the epoch (moby image/tarexport/save.go). Its
# JSON, field order included, is what the layer's v1 ID hashes.
_V1_EMPTY_CONFIG = (
    '{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,'
    '"AttachStderr":false,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":null,'
    '"Cmd":null,"Image":"","Volumes":null,"WorkingDir":"","Entrypoint":null,'
    '"OnBuild":null,"Labels":null}')
_V1_EPOCH = "1970-01-01T00:00:00Z"


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


def legacy_layer_folders(diff_ids: Sequence[str]) -> tuple[str, ...]:
    """The folder names [n_layers - 1] Docker < 25 gives every layer but the top one in
    a save archive: sha256 of the layer's v1 configuration, its chain ID and its
    parent's v1 ID, as JSON with sorted keys (moby image/v1 CreateID)."""
    folders: list[str] = []
    for chain_id in chain_ids(diff_ids)[:-1]:
        parent = f',"parent":"sha256:{folders[-1]}"' if folders else ""
        body = (f'{{"container_config":{_V1_EMPTY_CONFIG},"created":"{_V1_EPOCH}",'
                f'"layer_id":"{chain_id}"{parent}}}')
        folders.append(hashlib.sha256(body.encode("ascii")).hexdigest())
    return tuple(folders)


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
    """Where each layer of an image lies in its save archive [n_layers], base first:
    a folder (legacy format) or a blob path (OCI), None where it is not known in
    advance (the top layer's folder in the legacy format)."""

    format: SaveFormat
    units: tuple[str | None, ...]

    def dropped_units(self, image: ImageInfo, held: Sequence[bool]) -> frozenset[str]:
        """Archive entries that may be left out for a host that holds the layers marked
        in ``held``. A layer whose content also appears at a position the host lacks
        stays, because the archive stores such twins once (one blob, or a link to the
        first folder) and the kept one must find it."""
        needed = {d for d, h in zip(image.diff_ids, held, strict=True) if not h}
        return frozenset(unit for unit, diff_id, h in
                         zip(self.units, image.diff_ids, held, strict=True)
                         if unit is not None and h and diff_id not in needed)

    def unit_of(self, member_name: str) -> str:
        """The entry a member of the archive belongs to (its folder, or itself)."""
        name = member_name.rstrip("/")
        return name.split("/", 1)[0] if self.format == "legacy" else name

    def is_layer_member(self, member_name: str) -> bool:
        if self.format == "legacy":
            return posixpath.basename(member_name) == "layer.tar"
        return member_name.startswith("blobs/")


def archive_layout(client: docker.DockerClient, image: ImageInfo) -> ArchiveLayout:
    """The layout of ``image``'s save archive on this daemon, without reading it."""
    if _daemon_api(client) >= _OCI_MIN_API:
        return _oci_layout(image)
    return ArchiveLayout("legacy", (*legacy_layer_folders(image.diff_ids), None))


def scan_layout(client: docker.DockerClient, image: ImageInfo, ref: str) -> ArchiveLayout:
    """Read ``ref``'s save archive once, skipping the data, to learn its layout from
    its manifest (a check of ``archive_layout``; it costs a full save)."""
    with docker_errors(f"reading the saved archive of {ref}"), SavedArchive(client, ref) as tar:
        for member in tar:
            if member.name.startswith("blobs/"):
                return _oci_layout(image)
            if member.name == "manifest.json":
                handle = tar.extractfile(member)
                return _legacy_layout(json.loads(handle.read()) if handle else [], image, ref)
    raise ImageError(f"the saved archive of {ref} has no manifest.json",
                     hint="the daemon's save format is not one this version knows")


def _oci_layout(image: ImageInfo) -> ArchiveLayout:
    return ArchiveLayout("oci", tuple(f"blobs/sha256/{d.split(':', 1)[1]}"
                                      for d in image.diff_ids))


def _legacy_layout(manifest: list[dict], image: ImageInfo, ref: str) -> ArchiveLayout:
    config = image.image_id.split(":", 1)[1] + ".json"
    entries = [m for m in manifest if m.get("Config") == config]
    paths = tuple(entries[0].get("Layers") or ()) if entries else ()
    if len(paths) != len(image.diff_ids):
        raise ImageError(f"the saved archive of {ref} lists {len(paths)} layers, the image "
                         f"has {len(image.diff_ids)}", hint="rebuild the image and retry")
    return ArchiveLayout("legacy", tuple(posixpath.dirname(p) for p in paths))


def _daemon_api(client: docker.DockerClient) -> tuple[int, ...]:
    with docker_errors("asking the Docker daemon for its version"):
        version = str(client.version().get("ApiVersion", "0"))
    return tuple(int(p) for p in version.split(".") if p.isdigit())
