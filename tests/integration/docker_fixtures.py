"""A real Docker daemon, a local base image and the project's image, once per session.

No registry is reachable, so the base image is made here: debootstrap a minimal Debian
bookworm (its python3 is 3.11, like the CPU torch wheel on disk) and import it. The
project image is built from docker/Dockerfile itself, with that base for both stages
and the CPU torch wheel offered to pip. Both are cached in the daemon under fixed
names and reused when present; nothing is torn down, because later tests (and the next
run) need them.

Without a daemon the tests skip, except under CI=true, where they fail: CI must have
started one (.ci/run does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from sparsek_remote import images
from sparsek_remote.errors import ImageError

BASE_IMAGE = "sparsek-test-base:bookworm"
# minbase has no venv; the Dockerfile installs Python with apt only when it is absent.
DEBOOTSTRAP_PACKAGES = "python3,python3-venv,ca-certificates"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
TORCH_WHEEL_GLOB = "torch-2.13.0+cpu-cp311-*.whl"
DAEMON_START_TIMEOUT_S = 60


def unavailable(reason: str) -> None:
    """Skip locally; fail under CI, where the missing part is a broken setup."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run must provide it)", pytrace=False)
    pytest.skip(reason)


def _ping() -> bool:
    try:
        images.docker_client(timeout_s=10)
    except ImageError:
        return False
    return True


def _start_dockerd() -> None:
    """Start dockerd in the background when this user may (root, binary present)."""
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        return
    log = open(os.path.join(tempfile.gettempdir(), "sparsek-test-dockerd.log"), "ab")  # noqa: SIM115
    subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
    while time.monotonic() < deadline and not _ping():
        time.sleep(1)


@pytest.fixture(scope="session")
def docker_client():
    """A client of a running daemon (started here if none answers and we may)."""
    if not _ping():
        _start_dockerd()
    if not _ping():
        unavailable("no Docker daemon answers (start dockerd, or set DOCKER_HOST)")
    return images.docker_client()


@pytest.fixture(scope="session")
def base_image(docker_client, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A minimal Debian with python3 and venv, imported from a debootstrap tree."""
    if images.image_info(docker_client, BASE_IMAGE) is not None:
        return BASE_IMAGE
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        unavailable("building the test base image needs debootstrap and root")
    root = tmp_path_factory.mktemp("debootstrap") / "root"
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={DEBOOTSTRAP_PACKAGES}", "bookworm",
         str(root), DEBIAN_MIRROR], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail("debootstrap failed:\n" + result.stdout[-3000:] + result.stderr[-3000:])
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    repository, tag = BASE_IMAGE.split(":")
    docker_client.api.import_image_from_stream(tar.stdout, repository=repository, tag=tag)
    tar.wait()
    shutil.rmtree(root, ignore_errors=True)
    return BASE_IMAGE


def torch_wheel_dir(tmp: Path) -> Path:
    """A folder holding only the CPU torch wheel that pip finds via PIP_FIND_LINKS."""
    for folder in filter(None, os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()):
        found = sorted(Path(folder).glob(TORCH_WHEEL_GLOB))
        if found:
            target = tmp / found[0].name
            try:
                os.link(found[0], target)
            except OSError:
                shutil.copyfile(found[0], target)
            return tmp
    unavailable(f"no {TORCH_WHEEL_GLOB} in PIP_FIND_LINKS")
    raise AssertionError("unreachable")


def build_options_for_tests(base: str, wheel_dir: Path) -> images.BuildOptions:
    """The project's Dockerfile on the local base with the CPU torch wheel."""
    ca = os.environ.get("PIP_CERT")
    return images.BuildOptions(
        builder_image=base, runtime_image=base, torch_index_url="https://pypi.org/simple",
        torch_spec="torch==2.13.0+cpu", wheel_dir=wheel_dir,
        ca_bundle=Path(ca) if ca and Path(ca).is_file() else None)


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return torch_wheel_dir(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="session")
def project_context(base_image: str, wheel_dir: Path,
                    project_root_session: Path) -> images.BuildContext:
    """The inputs of the project's image as the tests build it."""
    return images.collect_context(project_root_session,
                                  build_options_for_tests(base_image, wheel_dir))


@pytest.fixture(scope="session")
def project_image(docker_client, project_context: images.BuildContext) -> images.BuiltImage:
    """The project's image built from docker/Dockerfile (skipped when the tag exists)."""
    return images.build_image(project_context, docker_client)


@pytest.fixture(scope="session")
def project_root_session() -> Path:
    return Path(__file__).resolve().parents[2]


def remove_image(client, ref: str) -> None:
    """Remove ``ref`` if present, with its untagged parents (what `docker rmi` does)."""
    if images.image_info(client, ref) is not None:
        client.api.remove_image(ref, force=True)
