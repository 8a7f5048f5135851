"""A canary passphrase placed in .env (and in the environment) must appear in no output,
log, bundle, report, error or traceback. Everything here is the real command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.cli_helpers import TINY_JOB, cli

CANARY = "CANARY-6b1d0e-do-not-leak"
ADDRESS = "198.51.100.77"


@pytest.fixture
def canary_dir(workdir: Path) -> Path:
    (workdir / ".env").write_text(
        f"SPARSEK_HOSTS__LAB__ADDRESS={ADDRESS}\n"
        "SPARSEK_HOSTS__LAB__USER=ubuntu\n"
        "SPARSEK_HOSTS__LAB__KEY_PATH=/nonexistent/lab_ed25519\n"
        f"SPARSEK_HOSTS__LAB__KEY_PASSPHRASE={CANARY}\n")
    (workdir / "job.yaml").write_text(TINY_JOB)
    return workdir


def _all_files_text(root: Path) -> str:
    chunks = []
    for path in root.rglob("*"):
        if path.is_file() and not path.name.endswith(".env"):
            chunks.append(path.read_bytes().decode("utf-8", errors="replace"))
    return "\n".join(chunks)


@pytest.mark.slow
def test_canary_never_leaks(canary_dir: Path) -> None:
    env_canary = {"SPARSEK_HOSTS__LAB__KEY_PASSPHRASE": CANARY}
    outputs = []

    ok = cli("run", "job.yaml", "--target", "local", cwd=canary_dir)
    assert ok.returncode == 0, ok.output
    outputs.append(ok.output)

    as_json = cli("run", "job.yaml", "--target", "local", "--json", cwd=canary_dir,
                  env=env_canary)
    assert as_json.returncode == 0, as_json.output
    outputs.append(as_json.output)

    for args in (["hosts"], ["hosts", "--json"]):
        listed = cli(*args, cwd=canary_dir)
        assert listed.returncode == 0 and "lab" in listed.output, listed.output
        outputs.append(listed.output)

    remote = cli("run", "job.yaml", "--target", "lab", cwd=canary_dir)
    assert remote.returncode == 5, remote.output
    outputs.append(remote.output)

    (canary_dir / "bad.env").write_text(
        f"SPARSEK_HOSTS__LAB__ADDRESS={ADDRESS}\nSPARSEK_HOSTS__LAB__PORT=ssh\n"
        f"SPARSEK_HOSTS__LAB__KEY_PASSPHRASE={CANARY}\nSPARSEK_HOSTS__LAB__USER={CANARY}\n")
    broken = cli("--env-file", "bad.env", "hosts", cwd=canary_dir)
    assert broken.returncode == 2, broken.output
    outputs.append(broken.output)

    # An internal error with --debug prints a full traceback: still no canary.
    (canary_dir / "not-a-folder").write_text("x")
    crashed = cli("--debug", "report", "anything", cwd=canary_dir,
                  env={**env_canary, "SPARSEK_RESULTS_DIR": "not-a-folder"})
    assert crashed.returncode != 0
    outputs.append(crashed.output)

    everything = "\n".join(outputs) + _all_files_text(canary_dir)
    assert CANARY not in everything
    assert ADDRESS not in everything.replace(f"SPARSEK_HOSTS__LAB__ADDRESS={ADDRESS}", "")
    assert list((canary_dir / "results").glob("*/local/manifest.json"))
