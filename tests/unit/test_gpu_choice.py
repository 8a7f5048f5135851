"""Which GPUs a run spreads over: the one grammar, the settings that use it, and the runner
command lines (local and on a docker host) that carry it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsek_remote import remote
from sparsek_remote.errors import ConfigError, SettingsError
from sparsek_remote.gpuspec import canonical_gpu_spec, gpu_spec_text, parse_gpu_spec
from sparsek_remote.localhost import RunnerInvocation
from sparsek_remote.settings import load_settings
from sparsek_remote.workflow._remote_host import RunContext, _runner_argv
from sparsek_remote.workflow.deployments import Deployment
from tests.unit.cli_helpers import TINY_JOB, cli

RUN_ID = "20260101T000000Z-tiny-0a1b2c"
HOST = "SPARSEK_HOSTS__LAB__ADDRESS=198.51.100.7\n"


@pytest.mark.parametrize(("text", "spec", "written"), [
    ("all", "all", "all"), (" all ", "all", "all"), ("2", 2, "2"), ("08", 8, "8"),
    ("0,2", (0, 2), "0,2"), (" 2 , 0 ", (2, 0), "2,0"), ("3,", (3,), "3,"),
])
def test_the_grammar_reads_every_form_and_writes_it_back(text, spec, written):
    assert parse_gpu_spec(text) == spec
    assert gpu_spec_text(spec) == canonical_gpu_spec(text) == written
    assert parse_gpu_spec(written) == spec


@pytest.mark.parametrize(("text", "problem"), [
    ("0", "at least 1"), ("00", "at least 1"), ("1,1", "twice"), ("01,1", "twice"),
    ("-1", "not a choice"), ("x", "not a choice"), ("", "not a choice"), (",", "not a choice"),
    ("0,,2", "not a choice"), ("ALL", "not a choice"), ("\u0663", "not a choice"),
    ("1;reboot", "not a choice"),
])
def test_bad_choices_say_how_to_write_one(text, problem):
    with pytest.raises(ValueError) as caught:
        parse_gpu_spec(text)
    assert problem in str(caught.value) and "'3,' is GPU 3 alone" in str(caught.value)


# ---- settings ----------------------------------------------------------------------


def test_every_target_uses_every_gpu_unless_told(workdir: Path) -> None:
    settings = load_settings(_env(workdir, HOST))
    assert settings.gpus_for("local") == settings.gpus_for("lab") == "all"
    assert settings.host("lab").public_view()["gpus"] == "all"


def test_gpu_settings_are_kept_in_their_written_form(workdir: Path) -> None:
    settings = load_settings(_env(workdir, HOST + "SPARSEK_HOSTS__LAB__GPUS= 3 ,\n"
                                  "SPARSEK_LOCAL_GPUS=2\n"))
    assert settings.gpus_for("lab") == "3," and settings.gpus_for("local") == "2"
    assert settings.host("lab").public_view()["gpus"] == "3,"


@pytest.mark.parametrize(("line", "expected"), [
    ("SPARSEK_HOSTS__LAB__GPUS=0", "SPARSEK_HOSTS__LAB__GPUS: a count of GPUs must be at least 1"),
    ("SPARSEK_HOSTS__LAB__GPUS=1,1", "SPARSEK_HOSTS__LAB__GPUS: names one GPU twice"),
    ("SPARSEK_LOCAL_GPUS=some", "SPARSEK_LOCAL_GPUS: not a choice of GPUs"),
])
def test_a_bad_gpu_setting_names_its_key_and_the_fix(workdir: Path, line: str,
                                                     expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(_env(workdir, HOST + line + "\n"))
    message = str(caught.value)
    assert expected in message and "write 'all', a count such as '2'" in message
    assert "some" not in message  # values are never echoed


def _env(folder: Path, text: str) -> Path:
    path = folder / ".env"
    path.write_text(text, encoding="utf-8")
    return path


# ---- the runner's command line -----------------------------------------------------


def _invocation(**fields: object) -> RunnerInvocation:
    return RunnerInvocation(job_file=Path("job.json"), out_dir=Path("bundle"), run_id=RUN_ID,
                            host_alias="local", **fields)  # type: ignore[arg-type]


def _gpus_of(argv: list[str]) -> str | None:
    return argv[argv.index("--gpus") + 1] if "--gpus" in argv else None


def test_gpu_runs_ask_the_runner_for_the_chosen_gpus_and_cpu_runs_for_none():
    assert _gpus_of(_invocation().argv()) == "all"  # device auto, nothing chosen
    assert _gpus_of(_invocation(device="cuda", gpus="2, 0").argv()) == "2,0"
    assert _gpus_of(_invocation(device="auto", gpus="1,").argv()) == "1,"
    assert _gpus_of(_invocation(device="cpu", gpus="2").argv()) is None


def test_an_invocation_refuses_a_choice_of_gpus_that_is_not_one():
    with pytest.raises(ConfigError, match="gpus: names one GPU twice"):
        _invocation(gpus="0,0")


def test_a_docker_host_gives_the_container_every_gpu_and_the_runner_chooses(workdir: Path):
    settings = load_settings(_env(workdir, HOST + "SPARSEK_HOSTS__LAB__GPUS=0,2\n"))
    book = remote.RunBook.new(settings.state_dir, run_id=RUN_ID, job_name="tiny",
                              connect_timeout_s=5.0, hosts={})
    ctx = RunContext(settings, RUN_ID, book, 5.0, device="cuda")
    deployed = Deployment("sparsek:abc", "sha256:" + "0" * 64, 1000, 1000, 4, False,
                          "2026-01-01T00:00:00Z")
    job = remote.RemoteJob("lab", RUN_ID, "/home/u/sparsek-remote")
    argv = _runner_argv(ctx, "lab", deployed.runner(job.run_dir), job)
    image = argv.index("sparsek:abc")
    assert argv[argv.index("--gpus"):][:2] == ["--gpus", "all"]  # docker run's own flag
    assert argv.index("--gpus") < image and _gpus_of(argv[image:]) == "0,2"
    assert argv[image + 1:image + 4] == ["python", "-m", "sparsek.runner"]


# ---- end to end through the local target -------------------------------------------


TWO_GPUS = ("0, NVIDIA H100 80GB HBM3, GPU-aa, 580.65.06, 9.0\n"
            "1, NVIDIA H100 80GB HBM3, GPU-bb, 580.65.06, 9.0\n")


@pytest.fixture
def smi_calls(workdir: Path, fake_nvidia_smi) -> Path:
    """Two GPUs listed (the runner lists them only when asked for a choice of GPUs),
    and the tiny job in the working folder."""
    (workdir / "job.yaml").write_text(TINY_JOB, encoding="utf-8")
    return fake_nvidia_smi(TWO_GPUS)


def test_a_local_run_on_a_cpu_asks_for_every_gpu_and_stays_in_one_process(
        workdir: Path, smi_calls: Path) -> None:
    # PyTorch here sees no GPU: "all" must then run the job as one process, on the CPU.
    done = cli("run", "job.yaml", "--target", "local", "--no-report", "--json", cwd=workdir)
    assert done.returncode == 0, done.output
    assert "--query-gpu=index" in smi_calls.read_text(encoding="utf-8")
    bundles = list((workdir / "results").glob("*/local/manifest.json"))
    assert len(bundles) == 1 and not list(workdir.glob("results/*/local/.shards"))


def test_the_local_gpu_setting_reaches_the_runner(workdir: Path, smi_calls: Path) -> None:
    # Two GPUs asked for, on a run whose device is the CPU: the runner refuses, by name.
    done = cli("run", "job.yaml", "--target", "local", "--no-report", cwd=workdir,
               env={"SPARSEK_LOCAL_GPUS": "2"})
    assert done.returncode == 4, done.output
    assert "--gpus spreads a job over GPUs, but this run's device is cpu" in done.output
