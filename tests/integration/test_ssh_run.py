"""Run and fetch on real SSH hosts (network namespaces, real sshd, real keys), through
the real command line: two bare hosts in parallel, a detached run fetched later, the
host lock, and Ctrl-C asking whether to cancel."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sparsek_remote import artifacts, workflow
from sparsek_remote.settings import load_settings
from tests.integration.conftest import PASSPHRASE, cli_env, stored_bundles, wait_until
from tests.unit.cli_helpers import cli

pytestmark = pytest.mark.integration


def run_id_of(text: str) -> str:
    match = re.search(r"\b(\d{8}T\d{6}Z-[A-Za-z0-9._-]+-[0-9a-f]{6})\b", text)
    assert match, text
    return match.group(1)


def all_text(*roots: Path) -> str:
    chunks = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and path.name != ".env":
                chunks.append(path.read_bytes().decode("latin-1"))
    return "\n".join(chunks)


def test_run_and_fetch_on_two_bare_hosts(hosts, write_env, write_job, workdir) -> None:
    alpha, beta = hosts["alpha"], hosts["beta"]  # beta's key has a passphrase
    write_env(alpha, beta)
    job = write_job("pair", ["alpha", "beta"])

    result = cli("run", str(job), cwd=workdir)  # wheels built from the checkout

    assert result.returncode == 0, result.output
    run_id = run_id_of(result.stdout)
    assert f"alpha: stored results/{run_id}/alpha" in result.stdout
    assert f"beta: stored results/{run_id}/beta" in result.stdout
    assert "beta: " in result.stderr and "results written" in result.stderr  # live log
    stored = artifacts.load_run(workdir / "results", run_id)
    assert sorted(stored.bundles) == ["alpha", "beta"]
    for alias, bundle in stored.bundles.items():
        assert bundle.manifest.provenance.host_alias == alias
        assert {r.status for r in bundle.results.results} == {"ok"}
    assert (workdir / "results" / run_id / "_report" / "report.md").is_file()
    record = json.loads((workdir / ".sparsek" / "runs" / f"{run_id}.json").read_text())
    assert {a: h["stage"] for a, h in record["hosts"].items()} == {"alpha": "stored",
                                                                  "beta": "stored"}
    again = cli("fetch", cwd=workdir)
    assert again.returncode == 0 and "nothing to fetch" in again.stdout, again.output

    seen = result.output + again.output + all_text(
        workdir, alpha.remote_path / "runs" / run_id, beta.remote_path / "runs" / run_id)
    for secret in (PASSPHRASE, alpha.address, beta.address):
        assert secret not in seen


def test_detached_run_is_fetched_when_done_and_only_once(hosts, write_env, write_job,
                                                         workdir, wheels_dir) -> None:
    alpha = hosts["alpha"]
    write_env(alpha)
    job = write_job("later", ["alpha"], seconds_per_case=1.0)

    started = cli("run", str(job), "--detach", "--wheels", str(wheels_dir), "--no-report",
                  cwd=workdir)
    assert started.returncode == 0, started.output
    assert "alpha: started, detached" in started.stdout
    run_id = run_id_of(started.stdout)
    early = cli("fetch", cwd=workdir)
    assert early.returncode == 0, early.output
    assert f"{run_id} alpha: still running on the host" in early.stdout
    assert stored_bundles(workdir / "results") == set()

    assert alpha.wait_for_job_end(run_id) == 0
    done = cli("fetch", cwd=workdir)
    assert done.returncode == 0, done.output
    assert f"{run_id} alpha: stored" in done.stdout
    artifacts.validate_bundle(workdir / "results" / run_id / "alpha", expected_run_id=run_id)
    assert "nothing to fetch" in cli("fetch", cwd=workdir).stdout
    named = cli("fetch", run_id, cwd=workdir)
    assert named.returncode == 0 and f"{run_id} alpha: already stored" in named.stdout
    assert stored_bundles(workdir / "results") == {(run_id, "alpha")}


def test_runs_and_fetches_log_in_once_a_host_and_start_in_three_commands(
        hosts, write_env, write_job, workdir, wheels_dir) -> None:
    # Each command is a round trip, a few hundred milliseconds over a rented host's link.
    # Once the runner's virtualenv and the job script are on the host, a launch needs
    # three: the home folder with the virtualenv's install marker, the run folder (with
    # the free space and whether the job script is there), and the job's start. A fetch
    # of several runs logs in to a host once, even when one of its bundles is refused:
    # a bad bundle is no reason to drop a link that works.
    alpha = hosts["alpha"]
    write_env(alpha)
    wheels = ["--wheels", str(wheels_dir), "--no-report"]
    runs = []
    for name in ("installs", "ready"):
        mark = alpha.log_mark()
        started = cli("run", str(write_job(name, ["alpha"], seconds_per_case=0.2)),
                      "--detach", *wheels, cwd=workdir)
        assert started.returncode == 0, started.output
        seen = alpha.sessions_since(mark)  # sshd logs both before the client hears back
        assert seen.logins == 1, seen
        if name == "ready":
            assert seen.commands == 3, seen
        runs.append(run_id_of(started.stdout))
        assert alpha.wait_for_job_end(runs[-1]) == 0

    # fetch takes the newest run first: its refusal comes before the other run's fetch.
    results_file = alpha.remote_path / "runs" / runs[1] / "bundle" / "results.json"
    data = json.loads(results_file.read_text())
    data["results"][0]["gate"]["rel_error"] = 0.5  # edited after the runner signed it
    results_file.write_text(json.dumps(data, indent=2))

    mark = alpha.log_mark()
    fetched = cli("fetch", cwd=workdir)
    assert fetched.returncode == 3, fetched.output
    assert f"{runs[1]} alpha" in fetched.output and "bundle refused" in fetched.stderr
    assert stored_bundles(workdir / "results") == {(runs[0], "alpha")}
    assert alpha.sessions_since(mark).logins == 1


def test_a_busy_host_is_refused_and_a_stale_lock_can_be_cleared(hosts, write_env, write_job,
                                                                workdir, wheels_dir) -> None:
    alpha = hosts["alpha"]
    write_env(alpha)
    wheels = ["--wheels", str(wheels_dir), "--no-report"]
    holder = cli("run", str(write_job("holder", ["alpha"], seconds_per_case=3.0)),
                 "--detach", *wheels, cwd=workdir)
    assert holder.returncode == 0, holder.output
    holder_id = run_id_of(holder.stdout)
    job = write_job("second", ["alpha"])

    busy = cli("run", str(job), *wheels, cwd=workdir)

    assert busy.returncode == 5, busy.output
    assert f"host 'alpha' is busy: run {holder_id} holds its lock" in busy.stderr
    assert not list((alpha.remote_path / "runs").glob("*-second-*"))  # removed again
    cancelled = workflow.cancel_run(holder_id, load_settings(workdir / ".env"))
    assert cancelled == {"alpha": "cancelled"}
    assert not (alpha.remote_path / "lock").exists()

    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = alpha.remote_path / "lock"
    lock.mkdir()
    (lock / "run_id").write_text("20250101T000000Z-old-abcdef\n")
    (lock / "pid").write_text(f"{gone.pid}\n")
    stale = cli("run", str(job), *wheels, cwd=workdir)
    assert stale.returncode == 5, stale.output
    assert (f"host 'alpha' is locked by run 20250101T000000Z-old-abcdef, whose process "
            f"{gone.pid} is no longer running") in stale.stderr
    assert "--clear-stale-lock" in stale.stderr

    cleared = cli("run", str(job), "--clear-stale-lock", *wheels, cwd=workdir)
    assert cleared.returncode == 0, cleared.output
    assert stored_bundles(workdir / "results") == {(run_id_of(cleared.stdout), "alpha")}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_asks_whether_to_cancel_the_remote_job(hosts, write_env, write_job, workdir,
                                                      wheels_dir) -> None:
    alpha = hosts["alpha"]
    write_env(alpha)
    job = write_job("interrupted", ["alpha"], seconds_per_case=3.0)
    # Ctrl-C as a terminal sends it: with SIGINT at its default, whatever the test run
    # inherited (a shell ignores SIGINT in the background jobs it starts, and Python then
    # installs no KeyboardInterrupt handler at all).
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsek_remote", "run", str(job), "--wheels", str(wheels_dir),
         "--no-report"], cwd=workdir, env=cli_env(), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint)
    runs = alpha.remote_path / "runs"

    def job_started() -> bool:
        return any(p.stat().st_size > 0 for p in runs.glob("*-interrupted-*/events.jsonl"))

    wait_until(job_started)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate("y\n", timeout=120)

    assert proc.returncode == 130, stdout + stderr
    run_id = run_id_of(stderr)
    assert f"cancel the job of run {run_id} on alpha?" in stderr
    assert "alpha: cancelled" in stderr
    exit_code = (runs / run_id / "exit_code").read_text().strip()
    assert exit_code not in ("-", "0")
    assert not (alpha.remote_path / "lock").exists()
    assert stored_bundles(workdir / "results") == set()
