"""What deploy reads from a host's probe, and the ``docker run`` a run gets from deploy's
record. Pure parsing: the probe itself runs against real hosts in test_images_deploy."""

from __future__ import annotations

from sparsek_remote.workflow.deployments import CONTAINER_RUN_DIR, Deployment
from sparsek_remote.workflow.preflight import parse

H100_HOST = """\
user 1000 1000
gpu NVIDIA H100 80GB HBM3, 9.0, 580.65.06
gpu NVIDIA H100 80GB HBM3, 9.0, 580.65.06
docker 27.3.1
runtimes {"io.containerd.runc.v2":{"path":"runc"},"nvidia":{"path":"nvidia-container-runtime"}}
disk 104857600
ncu /usr/local/cuda/bin/ncu
profiling 1
"""

RUNPOD_LIKE = """\
user 0 0
gpu NVIDIA H100 PCIe, 9.0, 570.124.06
docker-error /bin/sh: 1: docker: not found
disk 52428800
ncu none
profiling 0
"""


def test_a_docker_host_with_gpus_is_read_whole() -> None:
    checks = parse(H100_HOST)
    assert (checks.uid, checks.gid) == (1000, 1000)
    assert len(checks.gpus) == 2 and checks.gpus[0].compute_capability == "9.0"
    assert checks.driver_ok and checks.nvidia_runtime and checks.docker_usable
    assert checks.free_disk_bytes == 100 * 2**30
    assert checks.auto_kind() == "docker"
    assert checks.problems("docker") == []
    assert "SYS_ADMIN" in checks.ncu_counters("docker")


def test_a_container_host_without_docker_is_bare_and_its_old_driver_is_named() -> None:
    checks = parse(RUNPOD_LIKE)
    assert not checks.docker_usable and "not found" in checks.docker_error
    assert checks.auto_kind() == "bare"
    assert checks.driver_ok is False
    assert any("570.124.06" in p and "580" in p for p in checks.problems("bare"))
    assert checks.ncu_counters("bare") == "allowed"


def test_gpus_docker_cannot_reach_make_a_bare_host() -> None:
    text = H100_HOST.replace('"nvidia":{"path":"nvidia-container-runtime"}', '"x":{}')
    checks = parse(text)
    assert not checks.nvidia_runtime and checks.auto_kind() == "bare"
    assert any("NVIDIA runtime" in p for p in checks.problems("docker"))


def test_garbage_lines_are_ignored_and_a_failing_nvidia_smi_is_reported() -> None:
    checks = parse("noise\nuser x y\ngpu NVIDIA-SMI has failed because it couldn't "
                   "communicate with the NVIDIA driver\ndisk lots\n")
    assert checks.gpus == () and checks.uid is None and checks.free_disk_bytes is None
    assert "couldn't communicate" in checks.gpu_error
    assert any("nvidia-smi failed" in p for p in checks.problems("bare"))


def test_the_runner_command_runs_the_recorded_image_as_the_remote_user() -> None:
    deployment = Deployment.from_checks("sparsek-remote:abc", "sha256:" + "1" * 64,
                                        parse(H100_HOST))
    runner = deployment.runner("/home/u/sparsek-remote/runs/20261125T101500Z-x-1a2b3c")
    launcher = list(runner.launcher)
    assert launcher[:2] == ["docker", "run"] and launcher[-1] == "sparsek-remote:abc"
    assert _value(launcher, "--user") == "1000:1000"
    assert _value(launcher, "--gpus") == "all"
    assert _value(launcher, "--network") == "none"
    assert _value(launcher, "--cap-add") == "SYS_ADMIN"
    mount = _value(launcher, "-v")
    assert mount == f"/home/u/sparsek-remote/runs/20261125T101500Z-x-1a2b3c:{CONTAINER_RUN_DIR}"
    assert runner.run_dir_inside == CONTAINER_RUN_DIR
    assert runner.extra_args == ("--image-digest", "sha256:" + "1" * 64)
    assert runner.cancel == ("docker", "rm", "-f", "sparsek-20261125T101500Z-x-1a2b3c")


def _value(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]
