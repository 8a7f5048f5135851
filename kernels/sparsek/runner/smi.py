"""One way to ask nvidia-smi: ``--query-gpu`` as CSV without a header line.

The runner asks it three things: the host's GPUs (``gpus``), the driver version when
NVML is missing (``provenance``), and a card's clocks and power around each timing
when NVML is missing (``cardstate``). Each reads the answer its own way.
"""

from __future__ import annotations

import shutil
import subprocess

TIMEOUT_S = 20.0


def tool() -> str | None:
    """Where nvidia-smi is, or None when it is not on PATH."""
    return shutil.which("nvidia-smi")


def query(fields: str, *, index: int | None = None, units: bool = True,
          timeout_s: float = TIMEOUT_S, path: str | None = None
          ) -> subprocess.CompletedProcess[str]:
    """``nvidia-smi --query-gpu=FIELDS --format=csv,noheader[,nounits] [-i INDEX]``;
    ``fields`` comma-separated. Raises FileNotFoundError when nvidia-smi is not on
    PATH, and what ``subprocess.run`` raises (OSError, TimeoutExpired)."""
    exe = path or tool()
    if exe is None:
        raise FileNotFoundError("nvidia-smi is not on PATH")
    argv = [exe, f"--query-gpu={fields}", "--format=csv,noheader" + ("" if units else ",nounits")]
    if index is not None:
        argv += ["-i", str(index)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
