"""A job spread over several runners: the plan, and the real command line with CPU
stand-in workers (``--workers N``), one of them killed for real mid-job.

The GPU path differs only in how workers are pinned (``CUDA_VISIBLE_DEVICES``) and
listed (nvidia-smi); both are checked here on nvidia-smi's own output format.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from sparsek.runner import gpus, run_job
from sparsek.runner.bundle import write_manifest, write_results
from sparsek.runner.gpus import Worker
from sparsek.runner.merge import SHARDS_FOLDER, ShardOutcome, merge_into
from sparsek.runner.shard import estimate_seconds, job_items, plan, select_items
from sparsek_remote.artifacts import validate_bundle
from sparsek_remote.errors import BundleError, ConfigError
from sparsek_remote.jobspec import load_job
from sparsek_remote.schema import LOG_NAME, RESULTS_NAME, GpuProvenance
from tests.kernels.runner_jobs import (
    HOST,
    ROOT,
    RUN_ID,
    SDPA_MATH,
    SPARSEK_REFERENCE,
    case,
    cli_args,
    cli_env,
    events_of,
    make_job,
)

# ---- the plan ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt4_job():
    return load_job(ROOT / "jobs" / "h100_gpt4.yaml")


@pytest.mark.parametrize("workers", [2, 3, 4, 8])
def test_the_plan_of_the_gpt4_job_is_balanced_and_complete(gpt4_job, workers):
    items = job_items(gpt4_job)
    cost = {i.label: estimate_seconds(gpt4_job, i, "cuda") for i in items}
    shards = plan(items, workers, lambda i: cost[i.label])
    placed = [i.label for s in shards for i in s.items]
    assert sorted(placed) == sorted(cost) and len(placed) == len(set(placed))
    loads = [s.estimated_s for s in shards]
    mean, biggest = sum(cost.values()) / workers, max(cost.values())
    # Greedy list scheduling ends at most one item above the mean; LPT within 4/3 of
    # the best split, which is at least max(mean, biggest item).
    assert max(loads) <= mean + biggest
    assert max(loads) <= 4 / 3 * max(mean, biggest)
    if mean > 2 * biggest:  # many items per worker: close to perfectly even
        assert max(loads) <= 1.05 * mean, loads
    for shard in shards:  # each worker runs its items in job order
        assert [i.position for i in shard.items] == sorted(i.position for i in shard.items)


def test_the_plan_depends_on_its_inputs_only(gpt4_job):
    items = job_items(gpt4_job)
    cost = lambda i: estimate_seconds(gpt4_job, i, "cuda")  # noqa: E731
    first = plan(items, 8, cost)
    shuffled = items[:]
    random.Random(3).shuffle(shuffled)
    assert plan(shuffled, 8, cost) == first == plan(items, 8, cost)


def test_the_estimate_ranks_what_takes_long(gpt4_job):
    items = {i.label: i for i in job_items(gpt4_job)}
    cost = {label: estimate_seconds(gpt4_job, item, "cuda") for label, item in items.items()}
    # Dense causal attention at 64k tokens is the longest; a profile adds to an item.
    assert max(cost, key=cost.get) == "long-64k/sdpa-cudnn"
    assert cost["long-64k/sdpa-flash"] > cost["gpt4-4k/sdpa-flash"] > cost["seed/sdpa-flash"]
    assert cost["seed/sdpa-cudnn"] > cost["seed/sdpa-flash"]  # only cudnn is profiled


def test_more_workers_than_items_leaves_some_idle():
    job = make_job([case("a")], [SDPA_MATH, SPARSEK_REFERENCE])
    shards = plan(job_items(job), 3, lambda i: 1.0)
    assert [len(s.items) for s in shards] == [1, 1, 0]


def test_selectors_pick_items_in_job_order_and_unknown_ones_are_named():
    job = make_job([case("a"), case("b")], [SDPA_MATH, SPARSEK_REFERENCE])
    picked = select_items(job, ["b/sdpa-math", "a/sparsek-reference"])
    assert [i.label for i in picked] == ["a/sparsek-reference", "b/sdpa-math"]
    with pytest.raises(ConfigError) as caught:
        select_items(job, ["a/sdpa-math", "c/sdpa-math", "a"])
    assert "'a', 'c/sdpa-math'" in str(caught.value) and "b/sparsek-reference" in str(caught.value)


# ---- GPUs and workers -------------------------------------------------------------

SMI = """\
0, NVIDIA H100 80GB HBM3, GPU-3b1f5e2a-0000-1111-2222-333344445555, 580.65.06, 9.0
1, NVIDIA H100 80GB HBM3, GPU-9c2d7a11-0000-1111-2222-333344445555, 580.65.06, 9.0
2, NVIDIA B200, GPU-77aa0000-0000-1111-2222-333344445555, [N/A], 10.0
"""


def test_nvidia_smi_listing_is_read_field_by_field():
    listed = gpus.parse_listing(SMI)
    assert [g.index for g in listed] == [0, 1, 2]
    assert listed[0] == GpuProvenance(index=0, name="NVIDIA H100 80GB HBM3",
                                      uuid="GPU-3b1f5e2a-0000-1111-2222-333344445555",
                                      driver_version="580.65.06", compute_capability="9.0")
    assert listed[2].driver_version is None and listed[2].compute_capability == "10.0"
    old_driver = gpus.parse_listing("0, Tesla, V100, GPU-1, 470.82.01\n", with_cc=False)
    assert old_driver[0].name == "Tesla, V100" and old_driver[0].compute_capability is None


def test_gpus_are_chosen_by_spec_within_what_is_visible():
    listed = gpus.parse_listing(SMI)
    assert gpus.parse_spec("all") == "all" and gpus.parse_spec("2") == 2
    assert gpus.parse_spec("0,2") == (0, 2) and gpus.parse_spec("2,") == (2,)
    for bad in ("0", "x", "1,1", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="'3,' is GPU 3 alone"):
            gpus.parse_spec(bad)
    assert [g.index for g in gpus.choose(listed, (2, 0))] == [2, 0]
    assert [g.index for g in gpus.choose(listed, 2)] == [0, 1]
    seen = gpus.visible(listed, "2,GPU-3b1f5e2a")
    assert [g.index for g in seen] == [2, 0]
    with pytest.raises(ConfigError, match="GPU 1"):
        gpus.choose(seen, (1,))
    with pytest.raises(ConfigError, match="more GPUs"):
        gpus.choose(seen, 3)
    with pytest.raises(ConfigError, match="'7'"):
        gpus.visible(listed, "7")


def test_workers_are_pinned_by_index_in_pci_order(fake_nvidia_smi, monkeypatch):
    # The stand-in refuses compute_cap as drivers before 510 do, so the listing falls
    # back to the older query.
    fake_nvidia_smi(SMI.replace(", 9.0", "").replace(", 10.0", ""), old_driver=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    workers = gpus.gpu_workers("all")
    assert [(w.number, w.label, w.folder) for w in workers] == [(2, "GPU 2", "gpu2"),
                                                                 (0, "GPU 0", "gpu0")]
    assert workers[0].env == {"CUDA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert workers[1].gpu.uuid == "GPU-3b1f5e2a-0000-1111-2222-333344445555"
    assert workers[1].gpu.compute_capability is None


# ---- merging -----------------------------------------------------------------------


def test_merging_moves_each_workers_files_and_records_a_lost_gpu(tmp_path: Path):
    job = make_job([case("a"), case("b")], [SDPA_MATH])
    shards = plan(job_items(job), 2, lambda i: 1.0)
    out = tmp_path / "bundle"
    (out / SHARDS_FOLDER).mkdir(parents=True)
    (out / LOG_NAME).write_text("the parent's own lines\n", encoding="utf-8")
    # Worker 0 finishes (with a profile's CSV beside its results); GPU 3 dies early.
    first = out / SHARDS_FOLDER / "gpu0"
    run_job(job, first, run_id=RUN_ID, host_alias=HOST, only=["a/sdpa-math"])
    provenance = validate_bundle(first).manifest.provenance
    (first / "ncu" / "a").mkdir(parents=True)
    (first / "ncu" / "a" / "sdpa-math.csv").write_text("ID,Metric\n", encoding="utf-8")
    (first / "manifest.json").unlink()
    write_manifest(first, run_id=RUN_ID, job=job, provenance=provenance)
    second = out / SHARDS_FOLDER / "gpu3"
    second.mkdir()
    (second / LOG_NAME).write_text("[1/1] b/sdpa-math: ...\n", encoding="utf-8")
    h100 = GpuProvenance(index=3, name="NVIDIA H100 80GB HBM3", uuid="GPU-3b1f5e2a")
    outcomes = [
        ShardOutcome(Worker(0, None), shards[0], first, validate_bundle(first), None, 1.0),
        ShardOutcome(Worker(3, h100), shards[1], second, None,
                     "its runner was killed by SIGKILL (signal 9) after 2 s", 2.0, "Killed"),
    ]
    merged = merge_into(out, job, RUN_ID, outcomes)
    valid = validate_bundle(out, expected_run_id=RUN_ID, expected_host=HOST)
    assert sorted(p.name for p in out.iterdir()) == \
        ["manifest.json", "ncu", RESULTS_NAME, LOG_NAME]
    assert (out / "ncu" / "a" / "sdpa-math.csv").read_text(encoding="utf-8") == "ID,Metric\n"
    ok, lost = valid.results.results
    assert (ok.status, ok.gpu_index, lost.status, lost.gpu_index) == ("ok", 0, "error", 3)
    assert lost.error == ("lost with GPU 3: its runner was killed by SIGKILL (signal 9) after "
                          "2 s; re-run with --only b/sdpa-math")
    assert lost.flops > 0 and lost.input_seed == 7
    assert [x.item for x in merged.lost] == ["b/sdpa-math"]
    # The ceilings each worker measured stay its GPU's; the lost GPU measured none.
    own = outcomes[0].bundle.results.ceilings
    assert own is not None and valid.results.ceilings == own
    assert valid.results.gpu_ceilings == [own.model_copy(update={"gpu_index": 0})]
    assert valid.results.ceilings_for(ok).gpu_index == 0
    gpus_listed = valid.manifest.provenance.gpus
    assert [(g.index, g.uuid) for g in gpus_listed] == [(0, None), (3, "GPU-3b1f5e2a")]
    log = (out / LOG_NAME).read_text(encoding="utf-8")
    assert log.startswith("the parent's own lines\n")
    assert "===== GPU 3: b/sdpa-math =====\n[1/1] b/sdpa-math: ...\nLOST: its runner" in log
    assert "its last words:\nKilled" in log


# ---- the command line with CPU stand-ins ------------------------------------------

# Samples stop at the time budget alone, so every item takes about as long: a worker
# killed after its first item still has items left to lose.
SLOW_TIMING = {"warmup": 1, "repetitions": 100_000, "max_seconds": 0.25, "flush_l2": True,
               "target_ci_rel": 1e-9, "measure_ceilings": False}
SDPA_CUDNN = {"kind": "sdpa", "backend": "cudnn"}


def small_job(cases: list[dict], implementations: list[dict], **policies):
    return make_job(cases, implementations, correctness={"max_queries": 8}, **policies)


def write_job(tmp_path: Path, job) -> Path:
    job_file = tmp_path / "job.json"
    job_file.write_text(job.model_dump_json(), encoding="utf-8")
    return job_file


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=cli_env(), timeout=120,
                          check=False)


@pytest.fixture(scope="module")
def spread_run(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("spread")
    # cudnn is absent on the CPU: skipped results merge like any other.
    job = small_job([case("a"), case("c", dtype="bfloat16", causal=False)],
                    [SPARSEK_REFERENCE, SDPA_MATH, SDPA_CUDNN])
    done = run_cli(cli_args(write_job(tmp_path, job), tmp_path / "bundle", "--workers", "3",
                            "--git-commit", "0123abc"))
    return job, done, tmp_path / "bundle"


def test_three_workers_write_one_bundle_that_validates(spread_run):
    job, done, bundle = spread_run
    assert done.returncode == 0, done.stderr
    valid = validate_bundle(bundle, expected_run_id=RUN_ID, expected_host=HOST)
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", RESULTS_NAME, LOG_NAME]
    results = valid.results.results
    assert [(r.case, r.implementation) for r in results] == \
        [(c.name, i.label) for c in job.cases for i in job.implementations]
    assert {r.status for r in results if r.implementation != "sdpa-cudnn"} == {"ok"}
    provenance = valid.manifest.provenance
    assert [g.index for g in provenance.gpus] == [0, 1, 2]
    assert provenance.git_commit == "0123abc" and provenance.device == "cpu"


def test_each_result_carries_the_worker_that_measured_it(spread_run):
    _, done, bundle = spread_run
    evs = events_of(done.stdout)
    assigned = {item: e["gpu"] for e in evs if e["event"] == "worker_start" for item in e["items"]}
    assert sorted(set(assigned.values())) == [0, 1, 2] and len(assigned) == 6
    for result in validate_bundle(bundle).results.results:
        assert result.gpu_index == assigned[f"{result.case}/{result.implementation}"]
    log = (bundle / LOG_NAME).read_text(encoding="utf-8")
    for worker in range(3):  # the plan, then every worker's own log
        assert f"===== worker {worker}: " in log
    assert "a/sdpa-math: ok, median" in log


def test_the_event_stream_reads_as_one_job(spread_run):
    _, done, _ = spread_run
    evs = events_of(done.stdout)
    assert evs[0]["event"] == "start" and evs[0]["total"] == 6 and evs[0]["gpus"] == [0, 1, 2]
    finished = [e for e in evs if e["event"] == "case_done"]
    assert sorted(e["index"] for e in finished) == list(range(6))
    assert all(e["total"] == 6 for e in finished)
    assert evs[-1] == {"event": "done", "failed": [], "counts": {"ok": 4, "skipped": 2},
                       "lost": []}


def test_a_result_on_a_gpu_the_manifest_does_not_list_is_refused(spread_run, tmp_path: Path):
    _, _, bundle = spread_run
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    valid = validate_bundle(copy)
    results = valid.results.model_copy(update={"results": [
        r.model_copy(update={"gpu_index": 7 if n == 4 else r.gpu_index})
        for n, r in enumerate(valid.results.results)]})
    (copy / "manifest.json").unlink()
    write_results(copy, results)
    write_manifest(copy, run_id=RUN_ID, job=valid.manifest.job,
                   provenance=valid.manifest.provenance)
    with pytest.raises(BundleError, match=r"results\[4\] .* on GPU 7, which manifest.json "
                                          r"does not describe \(its provenance.gpus lists: "
                                          r"0, 1, 2\)"):
        validate_bundle(copy)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory):
    """Worker 1 is sent SIGKILL as soon as it has finished its first item."""
    tmp_path = tmp_path_factory.mktemp("killed")
    job = small_job([case("a"), case("b", S=40, causal=False), case("c", dtype="bfloat16")],
                    [SPARSEK_REFERENCE, SDPA_MATH], timing=SLOW_TIMING)
    job_file = write_job(tmp_path, job)
    proc = subprocess.Popen(cli_args(job_file, tmp_path / "bundle", "--workers", "3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    seen, pids, killed = [], {}, None
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        if event["event"] == "worker_start":
            pids[event["gpu"]] = event["pid"]
        if event["event"] == "case_done" and event["gpu"] == 1 and killed is None:
            killed = pids[1]
            os.kill(killed, signal.SIGKILL)
    stderr = proc.stderr.read()
    returncode = proc.wait(timeout=120)
    return job_file, seen, stderr, returncode, tmp_path


def test_a_killed_worker_loses_only_its_own_items(killed_run):
    _, seen, stderr, returncode, tmp_path = killed_run
    assert returncode == 0, stderr
    bundle = tmp_path / "bundle"
    results = validate_bundle(bundle, expected_run_id=RUN_ID).results.results
    assert not (bundle / ".shards").exists()
    mine = next(e["items"] for e in seen if e["event"] == "worker_start" and e["gpu"] == 1)
    assert len(mine) == 2
    for result in results:
        label = f"{result.case}/{result.implementation}"
        if label in mine:
            assert result.status == "error" and result.gpu_index == 1 and result.timing is None
            assert result.error.startswith("lost with worker 1: its runner was killed by "
                                           "SIGKILL (signal 9)")
            assert result.error.endswith(f"re-run with --only {label}")
        else:  # the other workers' results are whole
            assert result.status == "ok" and result.gpu_index in (0, 2)
            assert result.timing.stats.n > 0
    done = seen[-1]
    assert done["event"] == "done" and done["lost"] == mine and done["failed"] == mine
    lost_event = next(e for e in seen if e["event"] == "worker_done" and e["gpu"] == 1)
    assert not lost_event["ok"] and "SIGKILL" in lost_event["error"]
    assert sum(e["event"] == "case_done" for e in seen) == 6
    assert "worker 1 lost 2 item(s)" in stderr
    log = (bundle / LOG_NAME).read_text(encoding="utf-8")
    assert "LOST: its runner was killed by SIGKILL" in log


def test_lost_items_are_re_run_alone_with_the_hint(killed_run):
    job_file, seen, stderr, _, tmp_path = killed_run
    hint = re.search(r"re-run them alone with: (.*)", stderr).group(1).split()
    done = run_cli(cli_args(job_file, tmp_path / "rerun", *hint))
    assert done.returncode == 0, done.stderr
    lost = next(e["items"] for e in seen if e["event"] == "worker_start" and e["gpu"] == 1)
    results = validate_bundle(tmp_path / "rerun").results.results
    assert [f"{r.case}/{r.implementation}" for r in results] == lost
    assert all(r.gpu_index is None and r.status == "ok" for r in results)


def test_workers_that_overrun_the_job_time_are_stopped(tmp_path: Path):
    # timeouts.job_s of 10 leaves the workers 1 s; none finishes, so no bundle is made.
    job = make_job([case("a")], [SDPA_MATH, SPARSEK_REFERENCE],
                   timeouts={"job_s": 10})
    done = run_cli(cli_args(write_job(tmp_path, job), tmp_path / "bundle", "--workers", "1"))
    assert done.returncode == 4, done.stderr
    assert "no worker left a bundle" in done.stderr
    assert "worker 0: it was still running after 1 s" in done.stderr
    assert not (tmp_path / "bundle" / "manifest.json").exists()


def test_a_term_to_the_parent_stops_every_worker(tmp_path: Path):
    job = small_job([case("a"), case("b")], [SPARSEK_REFERENCE, SDPA_MATH], timing=SLOW_TIMING)
    proc = subprocess.Popen(cli_args(write_job(tmp_path, job), tmp_path / "bundle",
                                     "--workers", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=cli_env())
    pids = []
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "worker_start":
            pids.append(event["pid"])
        if event["event"] == "case_start":
            proc.send_signal(signal.SIGTERM)
            break
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    for pid in pids:  # stopped and reaped by the parent before it left
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (tmp_path / "bundle" / "manifest.json").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (("--gpus", "2"), "--gpus spreads a job over GPUs, but this run's device is cpu"),
    (("--workers", "2", "--only", "a/nope"), "'a/nope', which is not an item of the job"),
])
def test_bad_spreads_are_refused_before_anything_is_written(tmp_path: Path, extra, message):
    job = make_job([case("a")], [SDPA_MATH])
    done = run_cli(cli_args(write_job(tmp_path, job), tmp_path / "bundle", "--device", "cpu",
                            *extra))
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "bundle").exists()
