"""Where ``--gpus`` sends a job: over worker processes, or into the runner's own process
where there is nothing to spread it over (a CPU run, one GPU). GPUs are listed by an
nvidia-smi stand-in, as in the multi-GPU tests; PyTorch here sees no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsek.runner import gpus
from sparsek_remote.artifacts import validate_bundle
from sparsek_remote.errors import RunnerError
from tests.kernels.runner_jobs import HOST, RUN_ID, SDPA_MATH, case, make_job, run_cli

THREE_GPUS = """\
0, NVIDIA H100 80GB HBM3, GPU-3b1f5e2a-0000-1111-2222-333344445555, 580.65.06, 9.0
1, NVIDIA H100 80GB HBM3, GPU-9c2d7a11-0000-1111-2222-333344445555, 580.65.06, 9.0
2, NVIDIA B200, GPU-77aa0000-0000-1111-2222-333344445555, 580.65.06, 10.0
"""
PIN_2 = {"CUDA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
# With device auto, the runner spreads over the stand-in's GPUs wherever PyTorch sees one.
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(),
                                  reason="device auto must resolve to cpu here")


def test_a_cpu_run_and_the_default_choose_no_gpu_and_list_none(fake_nvidia_smi):
    calls = fake_nvidia_smi(THREE_GPUS)
    assert gpus.place("all", "cpu") == ([], None)
    assert gpus.place((0, 1), "cpu") == ([], None)  # refused later, once cpu is certain
    assert gpus.place(1, "cuda") == ([], None)
    assert not calls.exists()


def test_all_chooses_every_visible_gpu(fake_nvidia_smi, monkeypatch):
    fake_nvidia_smi(THREE_GPUS)
    chosen, why_none = gpus.place("all", "auto")
    assert [w.number for w in chosen] == [0, 1, 2] and why_none is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    chosen, _ = gpus.place("all", "cuda")
    assert [(w.number, w.env) for w in chosen] == [(2, PIN_2)]


def test_one_gpu_by_index_is_chosen_pinned(fake_nvidia_smi):
    fake_nvidia_smi(THREE_GPUS)
    chosen, _ = gpus.place((2,), "auto")
    assert [(w.number, w.gpu.name, w.env) for w in chosen] == [(2, "NVIDIA B200", PIN_2)]


def test_all_without_a_listing_stays_on_the_default_device(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    chosen, why_none = gpus.place("all", "auto")
    assert chosen == [] and "nvidia-smi is not on PATH" in why_none
    with pytest.raises(RunnerError, match="nvidia-smi is not on PATH"):
        gpus.place(2, "cuda")  # an explicit choice that cannot be met is an error


def test_all_without_a_visible_gpu_stays_on_the_default_device(fake_nvidia_smi, monkeypatch):
    fake_nvidia_smi(THREE_GPUS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # CUDA's way of hiding every GPU
    chosen, why_none = gpus.place("all", "auto")
    assert chosen == [] and "CUDA_VISIBLE_DEVICES names '-1'" in why_none


# ---- the command line --------------------------------------------------------------


def _job(device: str) -> str:
    return make_job([case("a"), case("b", S=33)], [SDPA_MATH],
                    correctness={"max_queries": 8}).model_copy(update={"device": device}
                                                               ).model_dump_json()


def _in_one_process(done, bundle: Path) -> None:
    """A bundle that validates, written by the runner itself: no shards, no per-GPU
    results, and the start event of a single runner."""
    assert done.returncode == 0, done.stderr
    valid = validate_bundle(bundle, expected_run_id=RUN_ID, expected_host=HOST)
    assert [r.status for r in valid.results.results] == ["ok", "ok"]
    assert all(r.gpu_index is None for r in valid.results.results)
    assert valid.manifest.provenance.gpus == [] and valid.manifest.provenance.device == "cpu"
    assert not (bundle / ".shards").exists()
    start = json.loads(done.stdout.splitlines()[0])
    assert start["event"] == "start" and "gpus" not in start


def test_gpus_all_on_a_cpu_run_runs_in_this_process(tmp_path: Path, fake_nvidia_smi):
    # Three GPUs listed, yet the job's device is cpu: nothing is listed, nothing spread.
    calls = fake_nvidia_smi(THREE_GPUS)
    done = run_cli(tmp_path, _job("cpu"), "--device", "cpu", "--gpus", "all")
    _in_one_process(done, tmp_path / "bundle")
    assert not calls.exists()


@needs_no_gpu
def test_gpus_all_where_pytorch_sees_no_gpu_runs_in_this_process(tmp_path: Path,
                                                                 fake_nvidia_smi):
    # Device auto: the GPUs are listed before PyTorch starts, then it resolves to cpu.
    calls = fake_nvidia_smi(THREE_GPUS)
    done = run_cli(tmp_path, _job("auto"), "--gpus", "all")
    _in_one_process(done, tmp_path / "bundle")
    assert "--query-gpu=index" in calls.read_text(encoding="utf-8")


@needs_no_gpu
def test_one_chosen_gpu_pins_this_process_before_cuda_starts(tmp_path: Path,
                                                             fake_nvidia_smi):
    fake_nvidia_smi(THREE_GPUS)
    done = run_cli(tmp_path, _job("auto"), "--gpus", "2,")
    assert done.returncode == 2  # the device resolved to cpu: a GPU by index is refused
    assert ("--gpus 2, chose GPU 2 alone; the job runs in this process, pinned to it "
            "(CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=2)") in done.stderr
    assert "--gpus spreads a job over GPUs, but this run's device is cpu" in done.stderr


@pytest.mark.parametrize(("value", "problem"), [("0", "a count of GPUs must be at least 1"),
                                                ("1,1", "names one GPU twice")])
def test_a_bad_choice_of_gpus_names_the_option_and_the_fix(tmp_path: Path, value, problem):
    done = run_cli(tmp_path, _job("cpu"), "--gpus", value)
    assert done.returncode == 2 and not (tmp_path / "bundle").exists()
    assert f"argument --gpus: {problem}; write 'all', a count such as '2'" in done.stderr
