"""Run the real `sparsek-remote` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

TINY_JOB = """\
name: tiny
cases:
  - {name: tiny-causal, B: 1, Hq: 2, Hkv: 1, S: 24, D: 16, dtype: float32, causal: true,
     kv_budget: 4, window: 3, seed: 5}
implementations:
  - {kind: sparsek, impl: reference}
  - {kind: sdpa, backend: math}
timing: {warmup: 1, repetitions: 3, max_seconds: 1.0}
"""


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 300) -> Completed:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEK_")}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(PROJECT_ROOT / "orchestrator"), str(PROJECT_ROOT / "kernels")])
    full_env["COLUMNS"] = "200"
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "sparsek_remote", *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    return Completed(proc.returncode, proc.stdout, proc.stderr)
