"""The partial archive, against the real daemon: it leaves out exactly the layers the
host holds, and ``docker load`` rebuilds the same image from it where those layers
are present (and refuses it where they are not).

A host is simulated on this daemon by removing the image while an image that shares
its lower layers stays; the host's view comes from the real query script.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from sparsek_remote import images
from sparsek_remote.images import ArchiveLayout, HostImages, ImageInfo
from tests.integration import docker_fixtures

pytestmark = pytest.mark.integration


SMALL = "sparsek-test-small:layers"
HOLDER = "sparsek-test-holder:layers"


@pytest.fixture
def small_image(docker_client, base_image: str):
    """The base plus two small layers, built fresh for each test."""
    dockerfile = (f"FROM {base_image}\nRUN echo one > /one\nRUN echo two > /two\n").encode()
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        member = tarfile.TarInfo("Dockerfile")
        member.size = len(dockerfile)
        tar.addfile(member, io.BytesIO(dockerfile))
    context.seek(0)
    docker_fixtures.remove_image(docker_client, SMALL)
    errors = [line["error"] for line in docker_client.api.build(
        fileobj=context, custom_context=True, tag=SMALL, rm=True, decode=True)
        if "error" in line]
    info = images.image_info(docker_client, SMALL)
    if errors or info is None:
        pytest.fail(f"building {SMALL} on {base_image} failed: {errors or 'no image'}",
                    pytrace=False)
    yield info
    docker_fixtures.remove_image(docker_client, SMALL)


def host_view(tag: str) -> HostImages:
    """What this daemon reports through the query script a host runs."""
    result = subprocess.run(["sh", "-c", images.HOST_QUERY_SCRIPT, "sh", tag],
                            capture_output=True, text=True, timeout=120, check=True)
    return images.parse_host_query(result.stdout)


def write_archive(client, info: ImageInfo, tag: str, host: HostImages, layout: ArchiveLayout,
                  path: Path) -> images.ArchiveStats:
    with path.open("wb") as out:
        return images.PartialArchive(client, info, tag, host, layout).write_to(out)


def layer_entries(path: Path, layout: ArchiveLayout) -> dict[str, str]:
    """Layer tars in the archive: name -> sha256 of their bytes (their diff ID)."""
    found: dict[str, str] = {}
    with tarfile.open(path, mode="r:gz") as tar:
        for member in tar:
            if layout.is_layer_member(member.name) and member.isreg():
                found[member.name] = "sha256:" + hashlib.sha256(
                    tar.extractfile(member).read()).hexdigest()
    return found


def docker_load(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "load", "-i", str(path)], capture_output=True, text=True,
                          timeout=900)


def test_chain_ids_name_the_daemons_own_layers(docker_client, small_image: ImageInfo) -> None:
    info = docker_client.info()
    layerdb = Path(info["DockerRootDir"]) / "image" / info["Driver"] / "layerdb" / "sha256"
    if not layerdb.is_dir():
        pytest.skip(f"{layerdb} is not readable here")
    for chain_id in images.chain_ids(small_image.diff_ids):
        assert (layerdb / chain_id.split(":")[1]).is_dir(), chain_id


def test_host_query_names_the_image_when_the_host_has_it(small_image: ImageInfo) -> None:
    view = host_view(SMALL)
    assert view.image_id == small_image.image_id


def test_archive_leaves_out_held_layers_and_loads_to_the_same_image(
        docker_client, small_image: ImageInfo, base_image: str, tmp_path: Path) -> None:
    layout = images.archive_layout(docker_client, small_image)
    base = images.image_info(docker_client, base_image)
    host = HostImages(None, frozenset(images.chain_ids(base.diff_ids)))
    archive = tmp_path / "partial.tar.gz"
    stats = write_archive(docker_client, small_image, SMALL, host, layout, archive)
    assert (stats.layers_total, stats.layers_sent, stats.unplaced_layers) == (3, 2, 1)
    sent = layer_entries(archive, layout)
    assert sorted(sent.values()) == sorted(small_image.diff_ids[1:])
    assert stats.wire_bytes < 64 * 1024  # the base layer (hundreds of MB) stayed home

    docker_client.api.remove_image(SMALL)  # its two layers go; the base's stays
    view = host_view(SMALL)
    assert view.image_id is None
    assert view.held_mask(small_image) == (True, False, False)

    loaded = docker_load(archive)
    assert loaded.returncode == 0, loaded.stderr
    assert images.image_info(docker_client, SMALL).image_id == small_image.image_id


def test_an_archive_without_a_layer_the_host_lacks_is_refused(
        docker_client, small_image: ImageInfo, tmp_path: Path) -> None:
    """The control: if the query were wrong, the load would fail, not corrupt."""
    layout = images.archive_layout(docker_client, small_image)
    claims_all = HostImages(None, frozenset(images.chain_ids(small_image.diff_ids)))
    archive = tmp_path / "too-small.tar.gz"
    stats = write_archive(docker_client, small_image, SMALL, claims_all, layout, archive)
    # Only the top layer travels (its folder is never predicted, so never left out).
    assert stats.layers_sent == 1
    assert list(layer_entries(archive, layout).values()) == [small_image.diff_ids[-1]]
    docker_client.api.remove_image(SMALL)
    assert host_view(SMALL).held_mask(small_image) == (True, False, False)
    loaded = docker_load(archive)
    assert loaded.returncode != 0
    assert "layer.tar" in loaded.stderr or "blobs" in loaded.stderr, loaded.stderr
    assert images.image_info(docker_client, SMALL) is None


def test_predicted_layout_names_the_folders_the_daemon_writes(
        docker_client, small_image: ImageInfo) -> None:
    """The layout comes without reading the image; a full read must agree with it."""
    predicted = images.archive_layout(docker_client, small_image)
    scanned = images.scan_layout(docker_client, small_image, SMALL)
    assert predicted.format == scanned.format
    known = [(p, s) for p, s in zip(predicted.units, scanned.units) if p is not None]
    assert known and all(p == s for p, s in known)
    assert predicted.units.count(None) <= 1


def test_project_image_without_its_top_layer_ships_only_that_layer(
        docker_client, project_context, tmp_path: Path) -> None:
    """The host lacks only the layer the sources are in: exactly that layer is sent,
    compressed, and the load gives the same image ID."""
    built, holder = _with_lower_layers_held(docker_client, project_context)
    info, tag = built.info, built.tag
    layout = images.archive_layout(docker_client, info)
    expected = HostImages(None, frozenset(images.chain_ids(info.diff_ids[:-1])))
    archive = tmp_path / "top.tar.gz"
    stats = write_archive(docker_client, info, tag, expected, layout, archive)
    assert list(layer_entries(archive, layout).values()) == [info.diff_ids[-1]]
    assert stats.layers_sent == 1 and stats.wire_bytes < 20 * 2**20

    docker_client.api.remove_image(tag)  # pruning stops at the tagged holder
    host = host_view(tag)
    assert host.image_id is None
    assert host.held_mask(info) == expected.held_mask(info)
    assert images.image_info(docker_client, holder) is not None

    loaded = docker_load(archive)
    assert loaded.returncode == 0, loaded.stderr
    assert images.image_info(docker_client, tag).image_id == info.image_id


def _with_lower_layers_held(client, context: images.BuildContext
                            ) -> tuple[images.BuiltImage, str]:
    """The project image, and a tag (kept between runs: it keeps the build cache) on
    an image holding all its layers but the top one."""
    built = images.build_image(context, client)
    if _holder_of(client, built.info) is None:
        built = images.build_image(context, client, force=True)  # a loaded image has no chain
    holder = _holder_of(client, built.info)
    if holder is None:
        pytest.fail("the build left no image with all but the top layer")
    client.api.tag(holder, *HOLDER.split(":"))
    return built, HOLDER


def _holder_of(client, info: ImageInfo) -> str | None:
    """Walk the build's parent chain to the first image without the top layer."""
    current = info.image_id
    while current:
        raw = client.api.inspect_image(current)
        if raw["RootFS"]["Layers"] == list(info.diff_ids[:-1]):
            return raw["Id"]
        current = raw.get("Parent") or ""
    return None
