"""Where and with what the numbers were measured.

The host is named only by the alias the orchestrator passes in: neither the
hostname nor any address is ever read here, so neither can reach a bundle.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

from sparsek.runner import smi
from sparsek_remote.schema import Provenance

_TEXT_LIMIT = 200
_NVIDIA_SMI_TIMEOUT_S = 10


def collect(device: str, *, host_alias: str, git_commit: str | None = None,
            git_dirty: bool | None = None, image_digest: str | None = None) -> Provenance:
    """Describe this machine and software; raises pydantic's ValidationError when an
    argument (alias, commit, digest) does not have the form the schema requires."""
    cpu = _cpu_name()
    gpu = device == "cuda"
    return Provenance(
        host_alias=host_alias,
        device=device,
        device_name=_clip(torch.cuda.get_device_name() if gpu else cpu),
        device_count=torch.cuda.device_count() if gpu else 0,
        compute_capability=_compute_capability() if gpu else None,
        driver_version=_driver_version() if gpu else None,
        cuda_version=torch.version.cuda,
        cpu_name=_clip(cpu),
        platform=_clip(platform.platform()),
        python_version=platform.python_version(),
        torch_version=torch.__version__,
        triton_version=_triton_version(),
        package_version=package_version(),
        git_commit=git_commit,
        git_dirty=git_dirty,
        image_digest=image_digest,
    )


def package_version() -> str:
    try:
        return importlib.metadata.version("sparsek-remote")
    except importlib.metadata.PackageNotFoundError:
        # Running from a source tree (PYTHONPATH) rather than an installed wheel.
        import sparsek_remote

        return sparsek_remote.__version__


def _clip(text: str) -> str:
    return text.strip()[:_TEXT_LIMIT]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _compute_capability() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _driver_version() -> str | None:
    return _driver_from_nvml() or _driver_from_nvidia_smi()


def _driver_from_nvml() -> str | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def _driver_from_nvidia_smi() -> str | None:
    try:
        done = smi.query("driver_version", timeout_s=_NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None
