"""deploy and run decide what an ``auto`` host is by one rule: docker when Docker
answers and can reach the host's GPUs (or it has none), bare otherwise.

deploy reads the whole probe, a run only the part that decides the kind. Both scripts
run here for real, in a local ``sh`` given the quoted command line as sshd would give
it to the login shell, on a PATH holding stand-ins for ``docker`` and ``nvidia-smi``
and nothing else the host lacks; the SSH link itself is tested in tests/integration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from sparsek_remote import remote
from sparsek_remote.errors import RemoteError
from sparsek_remote.settings import HostSettings, Settings
from sparsek_remote.workflow import docker_runner as docker_runner_of
from sparsek_remote.workflow import preflight
from sparsek_remote.workflow._remote_host import RunContext, _runner_for, host_kind
from sparsek_remote.workflow.preflight import Gpu, Preflight

RUN_ID = "20260101T120000Z-kind-1a2b3c"
H100 = Gpu("NVIDIA H100 80GB HBM3", "9.0", "580.65.06")
# What the probes call besides docker and nvidia-smi.
TOOLS = ("sh", "sed", "tail", "mkdir", "id", "df", "awk", "grep")


@dataclass(frozen=True)
class Host:
    docker: bool
    nvidia_runtime: bool
    gpus: int
    kind: str


HOSTS = {
    "docker, nvidia runtime, GPUs": Host(True, True, 2, "docker"),
    "docker, no nvidia runtime, GPUs": Host(True, False, 2, "bare"),
    "docker, no GPUs": Host(True, False, 0, "docker"),
    "no docker, GPUs": Host(False, False, 1, "bare"),
    "no docker, no GPUs": Host(False, False, 0, "bare"),
}


@pytest.mark.parametrize("case", HOSTS.values(), ids=HOSTS.keys())
def test_the_rule(case: Host) -> None:
    checks = Preflight(docker_version="27.3.1" if case.docker else None,
                       nvidia_runtime=case.nvidia_runtime, gpus=(H100,) * case.gpus)
    assert checks.auto_kind() == case.kind


@pytest.mark.parametrize("case", HOSTS.values(), ids=HOSTS.keys())
def test_deploy_and_run_agree_on_the_kind(case: Host, tmp_path: Path) -> None:
    conn = LocalShell(tmp_path, case)

    deployed = preflight.probe(conn, "sparsek-remote").auto_kind()  # as deploy does
    ran, book = kind_chosen_by_run(conn, tmp_path)

    assert deployed == ran == case.kind
    assert book.record.hosts["lab"].kind == case.kind


def test_a_docker_host_without_the_nvidia_runtime_gets_no_container(tmp_path: Path) -> None:
    """The case the two rules used to disagree on: Docker answers but cannot see the
    GPUs, so deploy installs wheels, and run must use them."""
    conn = LocalShell(tmp_path, HOSTS["docker, no nvidia runtime, GPUs"])
    checks = preflight.probe(conn, "sparsek-remote")
    assert checks.docker_usable and len(checks.gpus) == 2 and not checks.nvidia_runtime
    assert kind_chosen_by_run(conn, tmp_path)[0] == "bare"


class LocalShell:
    """Stands in for ``remote.Connection``: runs the quoted command line with ``sh -c``
    (as sshd does) on a PATH of the host's tools only."""

    alias = "lab"
    host = HostSettings(address="lab.example", kind="auto")

    def __init__(self, folder: Path, case: Host) -> None:
        tools = folder / "hostbin"
        tools.mkdir()
        for name in TOOLS:
            found = shutil.which(name)
            assert found is not None, name
            (tools / name).symlink_to(found)
        _script(tools / "docker", _docker(case))
        if case.gpus:  # a host without GPUs has no nvidia-smi
            _script(tools / "nvidia-smi", "\n".join(
                [f"echo '{H100.name}, {H100.compute_capability}, {H100.driver}'"] * case.gpus))
        self.home = folder / "home"
        self.home.mkdir()
        self._env = {"PATH": str(tools), "HOME": str(self.home)}

    def run(self, argv: Sequence[str], *, what: str, limit: float | None = None,
            stdin: bytes | None = None, check: bool = True) -> remote.CommandResult:
        proc = subprocess.run([self._env["PATH"] + "/sh", "-c", remote.quote_argv(argv)],
                              env=self._env, input=stdin, capture_output=True,
                              timeout=limit or 60)
        result = remote.CommandResult(self.alias, what, proc.returncode, proc.stdout,
                                      proc.stderr.decode())
        assert result.ok or not check, result.stderr
        return result


class _Bare(Exception):
    """Raised where the run would install the wheels of a bare host."""


def run_context(tmp_path: Path, **hooks: object) -> RunContext:
    state = tmp_path / "state"
    book = remote.RunBook.new(state, run_id=RUN_ID, job_name="kind", connect_timeout_s=5,
                              hosts={"lab": remote.HostRecord(remote_dir="sparsek-remote")})
    return RunContext(Settings(_env_file=None, state_dir=state), RUN_ID, book, 5.0,
                      **hooks)  # type: ignore[arg-type]


def kind_chosen_by_run(conn: LocalShell, tmp_path: Path) -> tuple[str, remote.RunBook]:
    """Which runner the run flow starts on ``conn``'s host: the image's or the wheels'."""
    in_image = remote.RunnerCommand(python="python", launcher=("docker", "run"))

    def wheels() -> list[Path]:
        raise _Bare()

    ctx = run_context(tmp_path, wheels=wheels,
                      docker_runner=lambda _alias, _run_dir: in_image)
    job = remote.RemoteJob("lab", RUN_ID, f"{conn.home}/sparsek-remote")
    try:
        kind = host_kind(ctx, conn, "lab")  # type: ignore[arg-type]
        runner = _runner_for(ctx, conn, "lab", job, kind, None)  # type: ignore[arg-type]
    except _Bare:
        return "bare", ctx.book
    assert runner is in_image
    return "docker", ctx.book


def test_an_auto_docker_host_without_an_image_names_the_setting_to_change(
        tmp_path: Path) -> None:
    conn = LocalShell(tmp_path, HOSTS["docker, no GPUs"])
    job = remote.RemoteJob("lab", RUN_ID, f"{conn.home}/sparsek-remote")
    settings = Settings(_env_file=None, state_dir=tmp_path / "state")
    for docker_runner in (None, docker_runner_of(settings)):  # no runner; nothing deployed
        ctx = run_context(tmp_path / str(docker_runner is None), docker_runner=docker_runner)
        with pytest.raises(RemoteError) as raised:
            kind = host_kind(ctx, conn, "lab")  # type: ignore[arg-type]
            _runner_for(ctx, conn, "lab", job, kind, None)  # type: ignore[arg-type]
        assert "docker host" in raised.value.message
        assert "SPARSEK_HOSTS__LAB__KIND=bare" in (raised.value.hint or "")


def _docker(case: Host) -> str:
    if not case.docker:
        return ("echo 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                "Is the docker daemon running?' >&2\nexit 1")
    runtimes = '"runc":{"path":"runc"}' + (
        ',"nvidia":{"path":"nvidia-container-runtime"}' if case.nvidia_runtime else "")
    return ('case "$1 $3" in\n'
            '  version*) echo 27.3.1;;\n'
            f"  *Runtimes*) echo '{{{runtimes}}}';;\n"
            "  info*) echo /var/lib/docker;;\n"
            '  *) echo "unexpected: $*" >&2; exit 2;;\n'
            "esac")


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n", encoding="utf-8")
    os.chmod(path, 0o755)
