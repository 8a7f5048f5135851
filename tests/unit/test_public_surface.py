"""The package's public surface: one place, sorted, and free of host-only imports."""

from __future__ import annotations

import subprocess
import sys

import sparsek_remote


def test_all_is_sorted_and_complete() -> None:
    names = sparsek_remote.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(sparsek_remote, name), name
    public = {n for n in vars(sparsek_remote) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(sparsek_remote, n)).__name__ == "module"}
    assert public - modules - set(names) == set()


def test_base_import_needs_no_host_or_gpu_packages() -> None:
    """The runner imports the job spec and schema inside the image, where fabric, docker,
    typer and matplotlib are not installed: importing the package must not pull them in."""
    code = (
        "import sys, sparsek_remote, sparsek_remote.schema, sparsek_remote.jobspec, "
        "sparsek_remote.artifacts\n"
        "heavy = {'fabric', 'paramiko', 'docker', 'typer', 'rich', 'matplotlib', 'torch'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_the_command_line_starts_without_docker_or_matplotlib() -> None:
    """Every command pays for what the CLI imports at start-up: the docker SDK is
    imported where a Docker client is made, matplotlib where a chart is drawn."""
    code = ("import sys, sparsek_remote.cli\n"
            "print(sorted({'docker', 'urllib3', 'matplotlib'} & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
