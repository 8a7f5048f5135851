"""The GPUs of this host, and the workers a multi-GPU run starts on them.

GPUs are listed by nvidia-smi (index, name, UUID, driver, compute capability), which
needs no CUDA context: the parent of a multi-GPU run never touches a GPU itself.
Each worker is pinned to its GPU by ``CUDA_VISIBLE_DEVICES=<index>`` with
``CUDA_DEVICE_ORDER=PCI_BUS_ID``: CUDA's own default order (fastest first) may differ
from the PCI bus order that nvidia-smi and NVML count in, and then an index would name
another card.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from dataclasses import dataclass, field

from sparsek.runner import smi
from sparsek_remote.errors import ConfigError, RunnerError
from sparsek_remote.gpuspec import ALL, GpuSpec, parse_gpu_spec
from sparsek_remote.schema import GpuProvenance

_QUERY = "index,name,uuid,driver_version,compute_cap"
_MISSING = {"", "[N/A]", "N/A", "[Not Supported]"}


@dataclass(frozen=True)
class Worker:
    """One runner subprocess of a multi-GPU run: ``number`` is its GPU's index (a CPU
    stand-in's own number), ``gpu`` what nvidia-smi said of it (None on the CPU) and
    ``env`` what its environment gets on top of this one's."""

    number: int
    gpu: GpuProvenance | None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"GPU {self.number}" if self.gpu is not None else f"worker {self.number}"

    @property
    def folder(self) -> str:
        return f"gpu{self.number}"


def parse_spec(text: str) -> GpuSpec:
    """``--gpus``, in the grammar the orchestrator's settings share (``gpuspec``); its
    complaint becomes argparse's, which shows it after the option's name."""
    try:
        return parse_gpu_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_listing(text: str, *, with_cc: bool = True) -> list[GpuProvenance]:
    """nvidia-smi's ``--query-gpu=index,name,uuid,driver_version[,compute_cap]`` CSV
    (no header) as GPU entries; a name may hold commas, so fields are taken from
    both ends. Lines that do not parse are skipped."""
    tail = 3 if with_cc else 2
    gpus = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(", ")]  # nvidia-smi's own separator
        if len(cells) < 2 + tail or not cells[0].isdigit():
            continue
        name = ", ".join(cells[1:len(cells) - tail]).strip()
        gpus.append(GpuProvenance(
            index=int(cells[0]), name=name[:200] or "unknown GPU",
            uuid=_cell(cells[-tail]), driver_version=_cell(cells[-tail + 1]),
            compute_capability=_cell(cells[-1]) if with_cc else None))
    return gpus


def _cell(cell: str) -> str | None:
    return None if cell in _MISSING else cell[:100]


def list_gpus() -> list[GpuProvenance]:
    """Every GPU nvidia-smi sees; RunnerError when it cannot say."""
    tool = smi.tool()
    if tool is None:
        raise RunnerError("cannot list this host's GPUs: nvidia-smi is not on PATH",
                          hint="run with --gpus 1 to use the default GPU alone")
    for with_cc in (True, False):  # drivers before 510 cannot be asked for compute_cap
        done = _smi(tool, _QUERY if with_cc else _QUERY.removesuffix(",compute_cap"))
        gpus = parse_listing(done.stdout, with_cc=with_cc) if done.returncode == 0 else []
        if gpus:
            return gpus
    raise RunnerError(f"cannot list this host's GPUs: nvidia-smi answered "
                      f"{(done.stderr or done.stdout).strip()[:300]!r}",
                      hint="check the driver with nvidia-smi; --gpus 1 uses the default GPU")


def _smi(tool: str, query: str) -> subprocess.CompletedProcess:
    try:
        return smi.query(query, path=tool)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RunnerError(f"cannot list this host's GPUs: nvidia-smi failed: {exc}",
                          hint="check the driver; --gpus 1 uses the default GPU") from None


def visible(gpus: list[GpuProvenance], cuda_visible: str | None) -> list[GpuProvenance]:
    """The GPUs this process may use: those ``CUDA_VISIBLE_DEVICES`` names (indices as
    nvidia-smi counts, or UUIDs), or all when it is unset."""
    if cuda_visible is None:
        return gpus
    chosen = []
    for entry in (e.strip() for e in cuda_visible.split(",") if e.strip()):
        match = [g for g in gpus if str(g.index) == entry
                 or (g.uuid is not None and entry.startswith("GPU-") and g.uuid.startswith(entry))]
        if len(match) != 1:
            raise ConfigError(f"CUDA_VISIBLE_DEVICES names {entry!r}, which is not one GPU "
                              "that nvidia-smi lists",
                              hint="unset CUDA_VISIBLE_DEVICES and choose GPUs with --gpus")
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


def choose(gpus: list[GpuProvenance], spec: GpuSpec) -> list[GpuProvenance]:
    """The GPUs ``spec`` asks for among ``gpus`` (already limited to the visible ones)."""
    if not gpus:
        raise RunnerError("this host shows no GPU to run on", hint="check nvidia-smi")
    if spec == ALL:
        return list(gpus)
    if isinstance(spec, int):
        if spec > len(gpus):
            raise ConfigError(f"--gpus {spec} asks for more GPUs than the {len(gpus)} this "
                              "host shows", hint="use --gpus all")
        return list(gpus[:spec])
    by_index = {g.index: g for g in gpus}
    missing = [i for i in spec if i not in by_index]
    if missing:
        raise ConfigError(f"--gpus names GPU {', '.join(map(str, missing))}, which this host "
                          "does not show", hint="visible GPUs: "
                          + ", ".join(f"{g.index} ({g.name})" for g in gpus))
    return [by_index[i] for i in spec]


def gpu_workers(spec: GpuSpec) -> list[Worker]:
    """One worker per GPU asked for, each pinned to its GPU."""
    gpus = choose(visible(list_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES")), spec)
    return [Worker(g.index, g, _pin(g)) for g in gpus]


def place(spec: GpuSpec, requested_device: str) -> tuple[list[Worker], str | None]:
    """The GPU workers ``spec`` asks for in a run on ``requested_device`` ("auto",
    "cuda" or "cpu"), listed through nvidia-smi, so without starting CUDA.

    None are chosen, and the run keeps its process's default device, for ``--gpus 1``,
    for a cpu run, and for ``all`` where no GPU can be listed (the second value then
    says why): ``all`` is every host's default, so it must also suit hosts with
    nothing to spread over. A count or list that cannot be met raises as ``choose``.
    """
    if spec == 1 or requested_device == "cpu":
        return [], None
    try:
        return gpu_workers(spec), None
    except (RunnerError, ConfigError) as exc:
        if spec != ALL:
            raise
        return [], exc.message


def _pin(gpu: GpuProvenance) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": str(gpu.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def cpu_workers(count: int) -> list[Worker]:
    """``count`` CPU stand-ins, sharing the cores between them so that they do not
    each start a thread per core."""
    if count < 1:
        raise ConfigError(f"--workers {count}: at least one worker is needed")
    threads = str(max(1, (os.cpu_count() or 1) // count))
    env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": threads}
    return [Worker(n, None, dict(env)) for n in range(count)]
