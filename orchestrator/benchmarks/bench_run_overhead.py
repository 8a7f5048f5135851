"""Benchmark (not a test) of two bars of `run` on hosts, against the SSH lab hosts of the
integration tier (network namespaces, each with its own sshd and address; run as root):

1. orchestration overhead of a tiny CPU job on one bare host: wall time of the real
   `sparsek-remote run JOB --target HOST` minus the runner's own wall time (bar <= 2 s);
2. fan-out: the same longer job on 4 hosts in one run vs on 1 host (bar <= 1.3x).

The lab hosts also share this machine's cores: four CPU-bound runners on 2 cores slow each
other down, which rented hosts (each with its own CPUs) do not. ``--host-cores C`` adds a
second fan-out measurement in which every host's sshd, and so every process it starts,
runs in a CPU cgroup of its own capped at C cores (one host alone gets the same C), so the
hosts behave as separate machines of equal size; the local command keeps the rest.

The lab hosts share this machine's filesystem, so the runner's wall time is read from
the host's run folder with this machine's clock: ``runner.pid`` is written as the runner
starts, ``exit_code`` as it ends. Connect+launch is the command's start up to the
runner's start; the tail (noticing the end, fetch, validate, store) is the runner's end
up to the command's exit.

    PYTHONPATH=orchestrator:kernels:. python orchestrator/benchmarks/bench_run_overhead.py \
        [--host-cores 0.4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(PROJECT_ROOT), str(PROJECT_ROOT / "orchestrator"),
                str(PROJECT_ROOT / "kernels")]

from sparsek_remote import artifacts  # noqa: E402
from sparsek_remote.workflow import build_wheels  # noqa: E402
from tests.integration.conftest import cli_env, job_yaml  # noqa: E402
from tests.integration.sshlab import SshHost, SshLab, make_user_key, missing_prerequisites  # noqa: E402, E501
from tests.unit.cli_helpers import TINY_JOB  # noqa: E402

OVERHEAD_BAR_S = 2.0
FANOUT_BAR = 1.3
ALIASES = ("alpha", "beta", "gamma", "delta")
RUN_ID = re.compile(r"\b(\d{8}T\d{6}Z-[A-Za-z0-9._-]+-[0-9a-f]{6})\b")


@dataclass(frozen=True)
class Timed:
    """One `run` through the real command: its wall time and each host's runner span."""

    run_id: str
    wall_s: float
    launch_s: dict[str, float]   # command start -> runner start, per host
    runner_s: dict[str, float]   # runner start -> runner end, per host
    tail_s: dict[str, float]     # runner end -> command exit, per host


def run_cli(workdir: Path, job: Path, hosts: list[SshHost], wheels: Path,
            *extra: str) -> Timed:
    argv = [sys.executable, "-m", "sparsek_remote", "run", str(job), "--wheels", str(wheels),
            "--no-report", *extra]
    start = time.time()
    proc = subprocess.run(argv, cwd=workdir, env=cli_env(), capture_output=True, text=True,
                          timeout=240)
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    match = RUN_ID.search(proc.stdout)
    if match is None:
        raise RuntimeError(f"no run id in the output:\n{proc.stdout}")
    launch, runner, tail = {}, {}, {}
    for host in hosts:
        run_dir = host.remote_path / "runs" / match.group(1)
        began = (run_dir / "runner.pid").stat().st_mtime
        ended = (run_dir / "exit_code").stat().st_mtime
        launch[host.alias], runner[host.alias] = began - start, ended - began
        tail[host.alias] = end - ended
    return Timed(match.group(1), end - start, launch, runner, tail)


class CpuSlices:
    """A CPU cgroup per lab host, each capped at the same number of cores, holding the
    host's sshd: the processes sshd starts (sessions, runners) are born inside it.
    cgroup v2 (``cpu.max``) where its cpu controller is on, else v1 (``cpu.cfs_quota_us``)."""

    PERIOD_US = 100_000
    V2 = Path("/sys/fs/cgroup")
    V1 = Path("/sys/fs/cgroup/cpu")

    def __init__(self, cores: float, token: str) -> None:
        if cores <= 0:
            raise ValueError(f"--host-cores must be above 0, got {cores}")
        self.quota_us = int(cores * self.PERIOD_US)
        controllers = self.V2 / "cgroup.controllers"
        self.v2 = controllers.exists() and "cpu" in controllers.read_text().split()
        if not self.v2 and not (self.V1 / "cpu.cfs_quota_us").exists():
            raise RuntimeError("--host-cores needs a cgroup cpu controller (v2 cpu.max or "
                               "v1 cpu.cfs_quota_us) writable by root; none is mounted")
        self.root = (self.V2 if self.v2 else self.V1) / f"sparsek-bench-{token}"
        self.groups: list[Path] = []

    def confine(self, host: SshHost) -> None:
        if host.proc is None:
            raise RuntimeError(f"the sshd of {host.alias} is not running")
        if not self.groups:
            if self.v2:  # cgroup v2 hands a controller down one level at a time
                (self.V2 / "cgroup.subtree_control").write_text("+cpu")
            self.root.mkdir()
            if self.v2:
                (self.root / "cgroup.subtree_control").write_text("+cpu")
        group = self.root / host.alias
        group.mkdir()
        self.groups.append(group)
        if self.v2:
            (group / "cpu.max").write_text(f"{self.quota_us} {self.PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        (group / "cgroup.procs").write_text(str(host.proc.pid))

    def release(self) -> None:
        """Move whatever is left back to the root group, then remove the groups."""
        for group in [*self.groups, self.root]:
            if not group.exists():
                continue
            top = self.root.parent / "cgroup.procs"
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # it ended meanwhile
                    top.write_text(pid)
            os.rmdir(group)


def write_job(workdir: Path, name: str, text: str) -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(text)
    return path


def command_start_s(workdir: Path, repeats: int) -> float:
    """Median wall time of `sparsek-remote --help`: the command's own start-up, which
    connect+launch includes."""
    times = []
    for _ in range(repeats):
        start = time.time()
        subprocess.run([sys.executable, "-m", "sparsek_remote", "--help"], cwd=workdir,
                       env=cli_env(), capture_output=True, check=True, timeout=60)
        times.append(time.time() - start)
    return statistics.median(times)


def bench_overhead(workdir: Path, host: SshHost, wheels: Path, repeats: int) -> dict:
    job = write_job(workdir, "tiny", "device: cpu\n" + TINY_JOB)
    runs = [run_cli(workdir, job, [host], wheels, "--target", host.alias)
            for _ in range(repeats)]
    a = host.alias
    med = statistics.median
    return {"wall": med(r.wall_s for r in runs), "runner": med(r.runner_s[a] for r in runs),
            "launch": med(r.launch_s[a] for r in runs), "tail": med(r.tail_s[a] for r in runs),
            "overhead": med(r.wall_s - r.runner_s[a] for r in runs),
            "command_start": command_start_s(workdir, repeats)}


def fanout_job(name: str, hosts: list[SshHost], seconds_per_case: float,
               repetitions: int | None) -> str:
    """The lab's fan-out job with the stop on a precise median turned off: each pair
    times for ``seconds_per_case`` (budget-bound), or for exactly ``repetitions`` calls
    when given (work-bound: the same CPU work whatever else runs)."""
    text = job_yaml(name, [h.alias for h in hosts], seconds_per_case=seconds_per_case)
    if repetitions is None:
        return text.replace("timing: {", "timing: {target_ci_rel: 1.0e-9, ")
    return text.replace("repetitions: 100000", f"repetitions: {repetitions}").replace(
        f"max_seconds: {seconds_per_case}", "max_seconds: 120, target_ci_rel: 1.0e-9")


def one_vs_four(workdir: Path, hosts: list[SshHost], wheels: Path, seconds_per_case: float,
                repetitions: int | None) -> tuple[dict, Timed]:
    tag = "b" if repetitions is None else "w"
    one = write_job(workdir, f"fan1{tag}",
                    fanout_job(f"fan1{tag}", hosts[:1], seconds_per_case, repetitions))
    many = write_job(workdir, f"fan4{tag}",
                     fanout_job(f"fan4{tag}", hosts, seconds_per_case, repetitions))
    single = run_cli(workdir, one, hosts[:1], wheels)
    fanned = run_cli(workdir, many, hosts, wheels)
    longest = max(fanned.runner_s.values())
    return {"one": single.wall_s, "four": fanned.wall_s, "ratio": fanned.wall_s / single.wall_s,
            "runner_one": single.runner_s[hosts[0].alias], "runner_four_max": longest,
            "overhead_one": single.wall_s - single.runner_s[hosts[0].alias],
            "overhead_four": fanned.wall_s - longest}, single


def samples_taken(workdir: Path, run: Timed, alias: str) -> int:
    """Fewest timed calls of any pair in a stored bundle (so that no pair of the
    fixed-work job does more work than it did in that run)."""
    bundle = artifacts.load_run(workdir / "results", run.run_id).bundles[alias]
    return min(r.timing.stats.n for r in bundle.results.results if r.timing is not None)


def bench_fanout(workdir: Path, hosts: list[SshHost], wheels: Path,
                 seconds_per_case: float, fixed_work: bool) -> tuple[dict, dict | None]:
    budget, single = one_vs_four(workdir, hosts, wheels, seconds_per_case, None)
    if not fixed_work:
        return budget, None
    calls = samples_taken(workdir, single, hosts[0].alias)
    work, _ = one_vs_four(workdir, hosts, wheels, seconds_per_case, calls)
    return budget, work


def verdict(measured: float, bar: float) -> str:
    return "pass" if measured <= bar else "MISS"


def fanout_rows(label: str, fan: dict) -> list[tuple[str, str, str, str]]:
    return [
        (f"{label}: wall 1 host / 4 hosts", f"{fan['one']:.2f} s / {fan['four']:.2f} s",
         "", ""),
        (f"{label}: runner 1 host / slowest of 4",
         f"{fan['runner_one']:.2f} s / {fan['runner_four_max']:.2f} s", "", ""),
        (f"{label}: wall - slowest runner, 1 / 4 hosts",
         f"{fan['overhead_one']:.2f} s / {fan['overhead_four']:.2f} s", "", ""),
        (f"{label}: fan-out ratio 4 / 1 hosts", f"{fan['ratio']:.2f}x",
         f"<= {FANOUT_BAR:g}x", verdict(fan["ratio"], FANOUT_BAR)),
    ]


def print_table(over: dict, budget: dict, work: dict | None, sliced: dict | None,
                host_cores: float | None) -> None:
    rows = [
        ("overhead: connect+launch (median)", f"{over['launch']:.2f} s", "", ""),
        ("  of which the command's own start-up (--help)", f"{over['command_start']:.2f} s",
         "", ""),
        ("overhead: runner end -> exit (follow, fetch, validate)", f"{over['tail']:.2f} s",
         "", ""),
        ("runner's own wall time, tiny job (median)", f"{over['runner']:.2f} s", "", ""),
        ("orchestration overhead, 1 host (median of runs)", f"{over['overhead']:.2f} s",
         f"<= {OVERHEAD_BAR_S:g} s", verdict(over["overhead"], OVERHEAD_BAR_S)),
        *fanout_rows("time-budget job", budget),
        *(fanout_rows("fixed-work job", work) if work else []),
        *(fanout_rows(f"hosts of {host_cores:g} cores each", sliced) if sliced else []),
    ]
    header = ("metric", "measured", "bar", "verdict")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds-per-case", type=float, default=1.5,
                        help="timing budget of each of the fan-out job's 4 pairs")
    parser.add_argument("--fixed-work", action="store_true",
                        help="also fan out a fixed amount of CPU work (minutes: 4 runners "
                        "share 2 cores and oversubscribe them)")
    parser.add_argument("--host-cores", type=float, default=None,
                        help="also fan out the time-budget job with each host in a CPU "
                        "cgroup of its own capped at this many cores (e.g. 0.4 with 4 "
                        "hosts on 2 cores), as separate machines would be")
    args = parser.parse_args()
    missing = missing_prerequisites()
    if missing:
        print("the SSH lab needs: " + ", ".join(missing), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        folder, workdir = Path(tmp) / "lab", Path(tmp) / "work"
        folder.mkdir()
        workdir.mkdir()
        lab = SshLab(folder)
        slices = CpuSlices(args.host_cores, lab.token) if args.host_cores else None
        sliced = None
        try:
            key = make_user_key(folder, "id_bench")
            hosts = [lab.add(alias, key) for alias in ALIASES]
            env = [line for host in hosts for line in host.env_lines()]
            (workdir / ".env").write_text("\n".join(env) + "\n")
            wheels = build_wheels(PROJECT_ROOT, Path(tmp) / "wheels")[0].parent
            # Not counted: the first run makes each host's venv and installs the wheels.
            warm = write_job(workdir, "warm", job_yaml("warm", list(ALIASES),
                                                       seconds_per_case=0.1))
            run_cli(workdir, warm, hosts, wheels)
            over = bench_overhead(workdir, hosts[0], wheels, args.repeats)
            budget, work = bench_fanout(workdir, hosts, wheels, args.seconds_per_case,
                                        args.fixed_work)
            if slices is not None:
                for host in hosts:
                    slices.confine(host)
                sliced, _ = one_vs_four(workdir, hosts, wheels, args.seconds_per_case, None)
        finally:
            lab.close()
            if slices is not None:
                slices.release()
    print_table(over, budget, work, sliced, args.host_cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
