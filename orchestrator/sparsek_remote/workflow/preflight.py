"""What a host offers, asked in one round trip: GPUs and driver, Docker and its NVIDIA
runtime, free disk, and whether Nsight Compute may read the GPU's counters.

The probe is a fixed script (it holds no value; the remote folder reaches it as
``$1``) whose lines are ``key value``; what it prints is read tolerantly, so a host
missing a tool simply reports it absent. A run on an ``auto`` host asks only the part
that decides its kind (``probe_kind``), read by the same parser and the same rule as
deploy's, so both always agree on what the host is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from sparsek_remote import remote

# CUDA 13 needs the R580 driver or newer.
MIN_DRIVER_MAJOR = 580
HostKind = Literal["docker", "bare"]

# The part of the probe that decides an ``auto`` host's kind: its GPUs, whether Docker
# answers, and whether Docker has the NVIDIA runtime.
KIND_PROBE = r"""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>&1 \
    | sed 's/^/gpu /'
fi
if out=$(docker version --format '{{.Server.Version}}' 2>&1); then
  echo "docker $out"
  echo "runtimes $(docker info --format '{{json .Runtimes}}' 2>/dev/null)"
  echo "docker-root $(docker info --format '{{.DockerRootDir}}' 2>/dev/null)"
else
  echo "docker-error $(printf %s "$out" | tail -n 1)"
fi
command -v nvidia-container-cli >/dev/null 2>&1 && echo "nvidia-toolkit yes"
"""

PROBE = r"""
dir="$HOME/$1"
mkdir -p "$dir" 2>/dev/null
echo "user $(id -u) $(id -g)"
""" + KIND_PROBE + r"""
echo "disk $(df -Pk "$dir" 2>/dev/null | tail -n 1 | awk '{print $4}')"
echo "ncu $(command -v ncu 2>/dev/null || echo none)"
echo "profiling $(grep -s RmProfilingAdminOnly /proc/driver/nvidia/params | awk '{print $2}')"
"""


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str
    driver: str

    @property
    def driver_ok(self) -> bool:
        major = self.driver.split(".", 1)[0]
        return major.isdigit() and int(major) >= MIN_DRIVER_MAJOR


@dataclass(frozen=True)
class Preflight:
    """One host's answers. ``docker_error`` says why Docker is not usable, if so."""

    uid: int | None = None
    gid: int | None = None
    gpus: tuple[Gpu, ...] = ()
    gpu_error: str = ""
    docker_version: str | None = None
    docker_error: str = ""
    nvidia_runtime: bool = False
    free_disk_bytes: int | None = None
    ncu_path: str | None = None
    profiling_admin_only: bool | None = None

    @property
    def docker_usable(self) -> bool:
        return self.docker_version is not None

    @property
    def driver_ok(self) -> bool | None:
        return all(g.driver_ok for g in self.gpus) if self.gpus else None

    def auto_kind(self) -> HostKind:
        """A docker host when Docker works and can reach the GPUs (or there are none
        to reach, as on a CPU test host); a bare host otherwise."""
        if self.docker_usable and (self.nvidia_runtime or not self.gpus):
            return "docker"
        return "bare"

    def ncu_counters(self, kind: HostKind) -> str:
        """Whether Nsight Compute may read counters, in words."""
        if self.profiling_admin_only is None:
            return "unknown (no NVIDIA driver answered)"
        if not self.profiling_admin_only:
            return "allowed"
        if kind == "docker":
            return "admin only: the container needs root and --cap-add SYS_ADMIN"
        return "allowed (root)" if self.uid == 0 else "denied: admin only, and not root"

    def problems(self, kind: HostKind) -> list[str]:
        """What stands in the way of a run, each with what to do."""
        found = []
        if self.gpu_error:
            found.append(f"nvidia-smi failed: {self.gpu_error}")
        for gpu in self.gpus:
            if not gpu.driver_ok:
                found.append(f"driver {gpu.driver} on {gpu.name} is older than "
                             f"{MIN_DRIVER_MAJOR} (CUDA 13 needs R{MIN_DRIVER_MAJOR}+)")
        if kind == "docker" and not self.docker_usable:
            found.append(f"Docker is not usable: {self.docker_error or 'not installed'}")
        if kind == "docker" and self.gpus and not self.nvidia_runtime:
            found.append("Docker has no NVIDIA runtime (install nvidia-container-toolkit)")
        return found


def probe(conn: remote.Connection, remote_dir: str, limit_s: float = 60.0) -> Preflight:
    """Ask the host; ``remote_dir`` is relative to the remote user's home."""
    result = conn.run(remote.sh_argv(PROBE, remote_dir), what="probing the host",
                      limit=limit_s, check=False)
    return parse(result.text)


def probe_kind(conn: remote.Connection, limit_s: float = 60.0) -> HostKind:
    """What an ``auto`` host is: ``auto_kind`` of the part of the probe it reads, so a
    run starts the runner where deploy put it."""
    result = conn.run(remote.sh_argv(KIND_PROBE), what="finding out whether it is a docker "
                      "or a bare host", limit=limit_s, check=False)
    return parse(result.text).auto_kind()


def parse(text: str) -> Preflight:
    """Read the probe's output (unknown or malformed lines are ignored)."""
    fields: dict[str, object] = {}
    gpus: list[Gpu] = []
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        value = value.strip()
        if key == "gpu":
            _read_gpu(value, gpus, fields)
        elif key in _READERS:
            fields.update(_READERS[key](value))
    return Preflight(gpus=tuple(gpus), **fields)  # type: ignore[arg-type]


def _read_gpu(value: str, gpus: list[Gpu], fields: dict[str, object]) -> None:
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 3 and re.fullmatch(r"\d+\.\d+", parts[1]):
        gpus.append(Gpu(*parts))
    elif value:
        fields["gpu_error"] = value[:200]


def _user(value: str) -> dict[str, object]:
    ids = value.split()
    if len(ids) == 2 and all(i.isdigit() for i in ids):
        return {"uid": int(ids[0]), "gid": int(ids[1])}
    return {}


def _number(value: str) -> dict[str, object]:
    return {"free_disk_bytes": int(value) * 1024} if value.isdigit() else {}


_READERS = {
    "user": _user,
    "docker": lambda v: {"docker_version": v} if v else {},
    "docker-error": lambda v: {"docker_error": v[:200] or "docker did not answer"},
    "runtimes": lambda v: {"nvidia_runtime": True} if '"nvidia"' in v else {},
    "nvidia-toolkit": lambda v: {"nvidia_runtime": True},
    "disk": _number,
    "ncu": lambda v: {"ncu_path": v} if v and v != "none" else {},
    "profiling": lambda v: {"profiling_admin_only": v == "1"} if v in ("0", "1") else {},
}
