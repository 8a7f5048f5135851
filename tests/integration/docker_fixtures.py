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
import signal
import socket
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


class ScratchDaemon:
    """A second Docker daemon with its own data root, socket and network namespace: a
    host that holds no image yet (images reach it through docker load alone)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "docker.sock"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, limit_s: float = DAEMON_START_TIMEOUT_S) -> ScratchDaemon:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(
                # Its own network namespace: with --bridge=none dockerd deletes the
                # bridge docker0 it finds, which here would be the main daemon's.
                ["unshare", "--net", "dockerd", "--data-root", str(self.folder / "data"),
                 "--exec-root", str(self.folder / "exec"), "-H", self.url,
                 "--pidfile", str(self.folder / "dockerd.pid"), "--bridge=none",
                 "--iptables=false", "--ip-masq=false"],
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the scratch dockerd exited:\n" + self.log_tail())
            if self.socket.exists() and self._answers():
                return self
            time.sleep(0.2)
        raise RuntimeError("the scratch dockerd did not answer in time:\n" + self.log_tail())

    def _answers(self) -> bool:
        result = subprocess.run(["docker", "-H", self.url, "version"], capture_output=True,
                                timeout=30)
        return result.returncode == 0

    def client(self):
        import docker

        return docker.DockerClient(base_url=self.url, timeout=600)

    def log_tail(self) -> str:
        path = self.folder / "dockerd.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self.folder / "data", ignore_errors=True)


class LoopbackSshd:
    """sshd on 127.0.0.1 (or ``address``, started through ``wrapper`` such as
    ``ip netns exec NS``) with keys made for it, whose sessions see ``DOCKER_HOST`` (so
    ``docker`` there is the scratch daemon) when one is given."""

    def __init__(self, folder: Path, docker_host: str | None = None, *,
                 address: str = "127.0.0.1", wrapper: tuple[str, ...] = ()) -> None:
        self.folder, self.docker_host = folder, docker_host
        self.address, self.wrapper = address, wrapper
        self.host_key = folder / "ssh_host_ed25519_key"
        self.user_key = folder / "id_ed25519"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> LoopbackSshd:
        self.folder.mkdir(parents=True, exist_ok=True)
        for key in (self.host_key, self.user_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                               check=True, timeout=30)
        (self.folder / "authorized_keys").write_text(
            (self.folder / "id_ed25519.pub").read_text())
        self.port = _free_port() if self.address == "127.0.0.1" else 22
        config = self.folder / "sshd_config"
        config.write_text(
            f"ListenAddress {self.address}\nPort {self.port}\nHostKey {self.host_key}\n"
            f"PidFile {self.folder / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}\n"
            "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nPermitRootLogin prohibit-password\nLogLevel ERROR\n"
            + (f"SetEnv DOCKER_HOST={self.docker_host}\n" if self.docker_host else ""))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(self.folder / "sshd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                stdout=log, stderr=log, start_new_session=True)
        _wait_port(self.address, self.port, self.proc)
        return self

    def fingerprint(self) -> str:
        out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{self.host_key}.pub"],
                             capture_output=True, text=True, check=True).stdout
        return out.split()[1]

    def host_settings(self, remote_dir: str = "sparsek-remote-test", kind: str = "auto"):
        from sparsek_remote.settings import HostSettings

        return HostSettings(address=self.address, port=self.port, user="root",
                            key_path=self.user_key, host_key_fingerprint=self.fingerprint(),
                            kind=kind, remote_dir=remote_dir)

    def ssh_argv(self) -> list[str]:
        """The system ssh client for this server (for baselines)."""
        return ["ssh", "-i", str(self.user_key), "-p", str(self.port), "-o",
                "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.folder}/known",
                "-o", "LogLevel=ERROR", f"root@{self.address}"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_port(address: str, port: int, proc: subprocess.Popen, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}")
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd does not listen on {address}:{port}")
