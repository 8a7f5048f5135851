"""The direction of dependencies (CONTRIBUTING.md) is held by import-linter's contracts
in pyproject.toml; this runs them so a wrong import fails the suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_import_contracts_hold(project_root: Path) -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.fail("import-linter is not installed; install the dev extra")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(project_root / "orchestrator"), str(project_root / "kernels")])
    result = subprocess.run([exe, "--no-cache"], cwd=project_root, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout
