"""Fixtures of the integration tier: SSH hosts in network namespaces (``sshlab``),
their ``.env``, job files, and the project's wheels built once per session.

Without root, sshd or iproute2 these tests skip, except under CI=true, where they
fail with what is missing (``.ci/run`` installs it all).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.docker_fixtures import (  # noqa: F401  (fixtures for every module)
    base_image,
    docker_client,
    project_context,
    project_image,
    project_root_session,
    wheel_dir,
)
from tests.integration.sshlab import SshHost, SshLab, make_user_key

PASSPHRASE = "correct horse battery staple 7f3a"
LAB_HOSTS = ("alpha", "beta", "gamma", "delta", "full")


@pytest.fixture(scope="session")
def ssh_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshLab]:
    """Five hosts, each in its own namespace with its own address and sshd:
    alpha, gamma and delta take a plain key, beta a key with a passphrase, and
    full has a 96 MiB tmpfs as its remote folder."""
    from tests.integration.sshlab import missing_prerequisites

    missing = missing_prerequisites()
    if missing:
        message = "SSH test hosts need: " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (.ci/run installs them)")
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("sshlab")
    lab = SshLab(folder)
    try:
        plain = make_user_key(folder, "id_plain")
        locked = make_user_key(folder, "id_locked", PASSPHRASE)
        for alias in LAB_HOSTS:
            lab.add(alias, locked if alias == "beta" else plain,
                    disk="96m" if alias == "full" else None)
        yield lab
    finally:
        lab.close()


@pytest.fixture
def hosts(ssh_lab: SshLab) -> Iterator[dict[str, SshHost]]:
    """The lab's hosts, put back in order after each test: links up, sshd running
    with a known key, no job left running, no lock left behind."""
    yield ssh_lab.hosts
    for host in ssh_lab.hosts.values():
        host.kill_jobs()
        host.restore_link() if host.proc is not None else host.start()
        lock = host.remote_path / "lock"
        if lock.exists():
            for child in lock.iterdir():
                child.unlink()
            lock.rmdir()


@pytest.fixture(scope="session")
def wheels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once for every test that passes --wheels."""
    from sparsek_remote.workflow import build_wheels
    from tests.conftest import PROJECT_ROOT

    cache = tmp_path_factory.mktemp("wheels")
    return build_wheels(PROJECT_ROOT, cache)[0].parent


@pytest.fixture
def write_env(workdir: Path) -> Callable[..., Path]:
    """Write ``.env`` naming the given hosts (host keys pinned unless ``pin=False``)."""

    def write(*lab_hosts: SshHost, pin: bool = True) -> Path:
        lines = [line for host in lab_hosts for line in host.env_lines(pin=pin)]
        path = workdir / ".env"
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


def job_yaml(name: str, targets: list[str], *, seconds_per_case: float = 0.5,
             connect_s: float = 5) -> str:
    """A CPU job of two tiny cases x two implementations (float32, S <= 48).
    ``seconds_per_case`` stretches the timing loop, to keep a job running a while."""
    return (f"name: {name}\ntargets: [{', '.join(targets)}]\ndevice: cpu\n"
            "cases:\n"
            "  - {name: causal, B: 1, Hq: 2, Hkv: 1, S: 48, D: 16, dtype: float32,"
            " causal: true, kv_budget: 8, window: 4, seed: 1}\n"
            "  - {name: odd, B: 1, Hq: 2, Hkv: 2, S: 31, D: 16, dtype: float32,"
            " causal: false, kv_budget: 5, window: 2, seed: 2}\n"
            "implementations:\n  - {kind: sparsek, impl: reference}\n"
            "  - {kind: sdpa, backend: math}\n"
            f"timing: {{warmup: 1, repetitions: 100000, max_seconds: {seconds_per_case}}}\n"
            f"timeouts: {{connect_s: {connect_s}, job_s: 300}}\n")


@pytest.fixture
def write_job(workdir: Path) -> Callable[..., Path]:
    def write(name: str, targets: list[str], **options: float) -> Path:
        path = workdir / f"{name}.yaml"
        path.write_text(job_yaml(name, targets, **options))
        return path

    return write


def wait_until(predicate: Callable[[], bool], limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not come true in time")
        time.sleep(0.1)


def stored_bundles(results_dir: Path) -> set[tuple[str, str]]:
    """(run id, host) of every bundle under ``results/`` (reports and staging aside)."""
    if not results_dir.is_dir():
        return set()
    return {(run.name, host.name)
            for run in results_dir.iterdir() if run.is_dir() and run.name[0].isdigit()
            for host in run.iterdir() if host.is_dir() and not host.name.startswith(("_", "."))}


def cli_env() -> dict[str, str]:
    """The environment of the real command in a subprocess (as ``tests.unit.cli_helpers``)."""
    from tests.unit.cli_helpers import PROJECT_ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEK_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PROJECT_ROOT / "orchestrator"), str(PROJECT_ROOT / "kernels")])
    env["COLUMNS"] = "200"
    return env
