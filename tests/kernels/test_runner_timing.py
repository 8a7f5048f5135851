"""How timings are taken and judged: the median's confidence interval, the sampling
decisions (graphs, input rotation, rounds, stopping), the card's state and the
throttle flag, and the fields a timed case carries into the bundle.

The decisions are pure functions and are checked against hand-worked numbers; the
CPU sampling loop and nvidia-smi run for real (a stand-in nvidia-smi on PATH prints
what a real one prints); NVML is exercised through a stand-in module, since no GPU
is here.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sparsek.runner import cardstate, run_case
from sparsek.runner.sampling import (
    MAX_GRAPH_CALLS,
    MAX_HEAD_START_US,
    MAX_ROTATION_SETS,
    calls_per_replay,
    head_start_us,
    min_samples,
    rotation_count,
    round_size,
    should_use_graph,
    stop_reason,
    warmup_chunk,
)
from sparsek.runner.stats import CI_MIN_SAMPLES, relative_ci
from sparsek.runner.timing import collect, measure, warm_up
from sparsek_remote.jobspec import TimingPolicy
from sparsek_remote.schema import CardState
from tests.kernels.runner_jobs import SDPA_MATH, case, make_job

MiB = 2**20


def policy(**fields) -> TimingPolicy:
    return TimingPolicy(**fields)


# --- the median's confidence interval ---------------------------------------------

def test_relative_ci_is_the_larger_reach_of_the_order_statistic_interval():
    # n = 10: the 95% interval is (x2, x9); median 5.5; reaches 3.5 below and 3.5 above.
    assert relative_ci([float(i) for i in range(1, 11)]) == pytest.approx(3.5 / 5.5)
    # Skewed: (x2, x9) = (10, 30) around a median of 10.5: the upper side decides.
    skewed = [9.0, 10.0, 10.0, 10.0, 10.0, 11.0, 11.0, 11.0, 30.0, 31.0]
    assert relative_ci(skewed) == pytest.approx((30.0 - 10.5) / 10.5)


def test_relative_ci_needs_six_samples_and_handles_a_zero_median():
    assert CI_MIN_SAMPLES == 6
    assert relative_ci([1.0] * 5) == math.inf
    assert relative_ci([1.0] * 6) == 0.0
    assert relative_ci([0.0] * 8) == 0.0
    assert relative_ci([0.0] * 7 + [1.0]) == math.inf  # (x1, x8) = (0, 1) around 0


# --- CUDA graphs and input rotation -----------------------------------------------

def test_graph_only_below_the_threshold_and_never_when_turned_off():
    p = policy()  # graph_below_us 20
    assert should_use_graph(5.0, p) and should_use_graph(19.9, p)
    assert not should_use_graph(20.0, p) and not should_use_graph(250.0, p)
    assert not should_use_graph(0.0, p)  # no estimate, no graph
    assert not should_use_graph(5.0, policy(graph_below_us=0))


def test_graph_size_fills_the_replay_time_within_bounds():
    p = policy(graph_replay_us=1000)
    assert calls_per_replay(10.0, p) == 100
    assert calls_per_replay(3.0, p) == 334          # ceil(1000 / 3)
    assert calls_per_replay(0.001, p) == MAX_GRAPH_CALLS  # a bogus estimate stays bounded
    assert calls_per_replay(900.0, p) == 2          # never a graph of one call
    assert calls_per_replay(5000.0, p) == 2


def test_head_start_outlasts_the_hosts_queueing_within_a_cap():
    assert head_start_us(0.0) == 20.0                 # a margin even for a free call
    assert head_start_us(400.0) == 820.0              # twice the host's time, plus the margin
    assert head_start_us(-1.0) == 20.0                # a clock step back is no time
    assert head_start_us(1e9) == MAX_HEAD_START_US    # a call that waits for the GPU itself


def test_rotation_only_when_a_set_fits_in_the_l2():
    auto = policy()
    l2 = 50 * MiB
    assert rotation_count(100 * MiB, l2, auto) == 1            # larger than L2: no copies
    assert rotation_count(50 * MiB, l2, auto) == 1
    assert rotation_count(20 * MiB, l2, auto) == 6              # ceil(2 * 50 / 20) + 1
    assert rotation_count(1 * MiB, l2, auto) == MAX_ROTATION_SETS
    assert rotation_count(20 * MiB, None, auto) == 1            # CPU: no L2 known
    assert rotation_count(20 * MiB, l2, policy(rotate_inputs="never")) == 1
    assert rotation_count(0, l2, auto) == 1


def test_rotation_always_is_bounded_by_memory():
    always = policy(rotate_inputs="always")
    l2 = 50 * MiB
    assert rotation_count(100 * MiB, l2, always) == 2           # ceil(2 * 50 / 100) + 1
    assert rotation_count(3 * 2**30, l2, always) == 1           # two copies would not fit
    assert rotation_count(2 * 2**30, l2, always) == 2


# --- rounds and stopping ----------------------------------------------------------

def test_stop_reasons_in_order_of_precedence():
    p = policy(repetitions=50, min_repetitions=10, max_seconds=2.0, target_ci_rel=0.01)
    assert stop_reason(10, 0.005, 0.1, p) == "ci"
    assert stop_reason(9, 0.005, 0.1, p) is None               # too few for the CI rule
    assert stop_reason(50, 0.5, 0.1, p) == "repetitions"
    assert stop_reason(50, 0.005, 9.0, p) == "ci"              # precision first
    assert stop_reason(12, 0.5, 2.0, p) == "budget"
    assert stop_reason(2, 0.5, 99.0, p) is None                # never fewer than three
    assert stop_reason(3, 0.5, 99.0, p) == "budget"


def test_the_ci_rule_waits_for_min_seconds_of_sampling():
    p = policy(repetitions=50, min_repetitions=10, max_seconds=5.0, min_seconds=1.0)
    assert stop_reason(10, 0.005, 0.5, p) is None              # precise, but too soon
    assert stop_reason(10, 0.005, 1.0, p) == "ci"
    assert stop_reason(50, 0.5, 0.5, p) == "repetitions"       # the cap still holds


def test_unset_seconds_mean_a_steady_gpu_and_nothing_on_the_cpu():
    gpu, cpu = policy().for_device("cuda"), policy().for_device("cpu")
    assert (gpu.warmup_seconds, gpu.min_seconds) == (1.0, 1.0)
    assert (cpu.warmup_seconds, cpu.min_seconds) == (0.0, 0.0)
    assert policy(max_seconds=0.5).for_device("cuda").min_seconds == 0.5  # within the budget
    chosen = policy(warmup_seconds=0.2, min_seconds=3.0).for_device("cuda")
    assert (chosen.warmup_seconds, chosen.min_seconds) == (0.2, 3.0)


def test_warm_up_chunks_double_until_both_the_count_and_the_seconds_are_done():
    p = policy(warmup=5)
    assert warmup_chunk(1, 2, True, p) == 2                    # time left: keep doubling
    assert warmup_chunk(3, 4, False, p) == 2                   # only the calls still owed
    assert warmup_chunk(7, 8, False, p) == 0


def test_warm_up_runs_for_its_seconds_after_the_first_call():
    # A clock that each call moves: 0.5 s for the first (compiling or tuning), 0.01 s
    # for each after it, so the test reads no wall time.
    now = [0.0]
    made: list[int] = []

    def run(k: int) -> None:
        now[0] += 0.5 if not made else 0.01 * k
        made.append(k)

    done = warm_up(run, policy(warmup=2, warmup_seconds=0.2).for_device("cpu"),
                   clock=lambda: now[0])
    # 0.2 s after the first call: 2 + 4 + 8 calls reach 0.14 s, 16 more pass 0.2 s.
    assert made == [1, 2, 4, 8, 16] and done == 31
    made.clear()
    assert warm_up(run, policy(warmup=0).for_device("cpu"), clock=lambda: now[0]) == 0
    assert made == []
    assert warm_up(run, policy(warmup=3).for_device("cpu"), clock=lambda: now[0]) == 3
    assert made == [1, 2]


def test_the_ci_rule_never_fires_without_a_real_95_percent_interval():
    p = policy(repetitions=5, min_repetitions=3)
    assert min_samples(p) == 3
    assert stop_reason(5, 0.0, 0.0, p) == "repetitions"
    assert stop_reason(4, 0.0, 0.0, p) is None


def test_round_sizes():
    p = policy(repetitions=200, min_repetitions=10, max_seconds=10.0)
    assert round_size(0, 0.0, 0.0, p) == 3                     # learn the cost first
    assert round_size(3, 0.001, 0.003, p) == 7                 # up to min_repetitions
    assert round_size(40, 0.001, 0.04, p) == 10                # grow by a quarter
    assert round_size(198, 0.001, 0.2, p) == 2                 # never past the cap
    assert round_size(40, 1.0, 8.5, p) == 1                    # only 1.5 s left
    assert round_size(1, 100.0, 1.0, p) == 2                   # three samples at least


def test_collect_stops_at_the_ci_when_samples_agree():
    p = policy(repetitions=10_000, min_repetitions=10, max_seconds=60, target_ci_rel=0.01)
    rounds: list[int] = []

    def take(k: int) -> list[float]:
        rounds.append(k)
        return [1.0] * k

    samples, reason = collect(take, p)
    assert reason == "ci" and len(samples) == 10 and rounds == [3, 7]


def test_collect_stops_at_the_budget_when_samples_scatter():
    p = policy(repetitions=10_000, min_repetitions=10, max_seconds=0.05, target_ci_rel=1e-6)
    state = {"i": 0}

    def take(k: int) -> list[float]:
        out = []
        for _ in range(k):
            time.sleep(0.002)
            state["i"] += 1
            out.append(1.0 + (state["i"] % 7) / 10)  # spread the CI never closes over
        return out

    begin = time.perf_counter()
    samples, reason = collect(take, p)
    assert reason == "budget" and 3 <= len(samples) <= 40
    assert time.perf_counter() - begin < 0.5  # the budget bounds it, with one sample's slack


def test_cpu_measure_cycles_over_the_input_sets_and_records_how_it_stopped():
    used = [0, 0, 0]

    def call(i: int):
        def run() -> None:
            used[i] += 1
        return run

    p = policy(warmup=3, repetitions=30, min_repetitions=10, max_seconds=60,
               target_ci_rel=1e-9)
    timing = measure(call(0), p, "cpu", rotation=[call(1), call(2)])
    assert timing.method == "wall-clock" and timing.rotation_sets == 3
    assert timing.stop_reason == "repetitions" and timing.stats.n == 30
    assert timing.target_ci_rel == 1e-9 and timing.calls_per_sample == 1
    assert used == [11, 11, 11]  # 3 warm-up + 30 samples, round robin


# --- the card's state and the throttle flag ---------------------------------------

def test_reason_bits_decode_to_names():
    assert cardstate.decode_reasons(0) == []
    assert cardstate.decode_reasons(0x1) == ["gpu_idle"]
    assert cardstate.decode_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert cardstate.decode_reasons(0x8000) == ["unknown_0x8000"]


def state(reasons=(), power_ns=None, thermal_ns=None, source="nvml") -> CardState:
    return CardState(source=source, sm_clock_mhz=1980, throttle_reasons=list(reasons),
                     power_violation_ns=power_ns, thermal_violation_ns=thermal_ns)


def test_throttle_verdict():
    unknown = CardState(source="unavailable", note="the run is on the CPU")
    assert cardstate.throttle_verdict(unknown, unknown) == (None, None)
    assert cardstate.throttle_verdict(None, None) == (None, None)
    # An idle card between cases lowers its clocks by design: not throttling.
    assert cardstate.throttle_verdict(state(["gpu_idle"]), state()) == (False, None)
    flagged, why = cardstate.throttle_verdict(state(), state(["sw_power_cap", "gpu_idle"]))
    assert flagged and why == "after: sw_power_cap"
    flagged, why = cardstate.throttle_verdict(state(power_ns=1_000_000, thermal_ns=5),
                                              state(power_ns=13_500_000, thermal_ns=5))
    assert flagged and why == "power-limited for 12.5 ms during the timing"
    assert cardstate.throttle_verdict(state(power_ns=7), state(power_ns=7)) == (False, None)


def test_a_cpu_run_reads_no_card():
    reader = cardstate.open_reader("cpu")
    reading = reader.read()
    assert reading.source == "unavailable" and "CPU" in reading.note
    reader.close()


FAKE_SMI = """\
#!{python}
import sys
args = " ".join(sys.argv[1:])
if "-i 0" not in args or "--format=csv,noheader,nounits" not in args:
    sys.exit("unexpected arguments: " + args)
if {old_driver} and "clocks_event_reasons.active" in args:
    print('Field "clocks_event_reasons.active" is not a valid field to query.')
    sys.exit(2)
print("{line}")
"""


def fake_smi(tmp_path: Path, monkeypatch, line: str, *, old_driver: bool = False) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text(FAKE_SMI.format(python=sys.executable, line=line, old_driver=old_driver),
                    encoding="utf-8")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as on a host without nvidia-ml-py


@pytest.mark.parametrize("old_driver", [False, True])
def test_nvidia_smi_reading_and_its_throttle_flag(tmp_path, monkeypatch, old_driver):
    fake_smi(tmp_path, monkeypatch, "1755, 2619, 1980, 71, 690.42, 700.00, 0x0000000000000004",
             old_driver=old_driver)
    reader = cardstate.open_reader("cuda", 0)
    assert isinstance(reader, cardstate.SmiReader)
    reading = reader.read()
    assert reading.source == "nvidia-smi"
    assert (reading.sm_clock_mhz, reading.memory_clock_mhz, reading.max_sm_clock_mhz) == \
        (1755, 2619, 1980)
    assert (reading.temperature_c, reading.power_w, reading.power_limit_w) == (71, 690.42, 700)
    assert reading.throttle_reasons == ["sw_power_cap"]
    assert cardstate.throttle_verdict(reading, reading)[0] is True
    assert reader.read() == reading  # the field name that worked is remembered


def test_nvidia_smi_not_available_values_are_empty_not_zero(tmp_path, monkeypatch):
    fake_smi(tmp_path, monkeypatch, "345, 1593, 1980, 33, [N/A], [N/A], 0x0000000000000001")
    reading = cardstate.open_reader("cuda", 0).read()
    assert reading.power_w is None and reading.power_limit_w is None
    assert reading.throttle_reasons == ["gpu_idle"]


def test_a_failing_nvidia_smi_gives_an_empty_reading_that_says_why(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"
    tool.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")
        sys.exit(9)
        """), encoding="utf-8")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", None)
    reading = cardstate.open_reader("cuda", 0).read()
    assert reading.source == "unavailable"
    assert "exit status 9" in reading.note and "couldn't communicate" in reading.note


class FakeNvml:
    """The few pynvml calls the reader makes, answering like an H100 under load."""

    class NVMLError(Exception):
        pass

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
    NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL = 0, 1

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.power_ns = 1_000_000

    def nvmlInit(self):
        self.calls.append("init")

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetClockInfo(self, handle, which):
        return {1: 1755, 2: 2619}[which]

    def nvmlDeviceGetMaxClockInfo(self, handle, which):
        return 1980

    def nvmlDeviceGetTemperature(self, handle, which):
        return 68

    def nvmlDeviceGetPowerUsage(self, handle):
        return 512_300  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return 0x1

    def nvmlDeviceGetViolationStatus(self, handle, policy):
        if policy == self.NVML_PERF_POLICY_THERMAL:
            raise self.NVMLError("Not Supported")
        self.power_ns += 2_000_000
        return SimpleNamespace(referenceTime=0, violationTime=self.power_ns)


def test_nvml_reading_converts_units_and_names_what_it_could_not_read(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    reader = cardstate.open_reader("cuda", 3)
    assert isinstance(reader, cardstate.NvmlReader) and reader.handle == ("handle", 3)
    before, after = reader.read(), reader.read()
    reader.close()
    assert nvml.calls == ["init", "shutdown"]
    assert before.source == "nvml" and before.power_w == pytest.approx(512.3)
    assert (before.sm_clock_mhz, before.memory_clock_mhz, before.max_sm_clock_mhz,
            before.temperature_c, before.power_limit_w) == (1755, 2619, 1980, 68, 700)
    assert before.throttle_reasons == ["gpu_idle"] and before.thermal_violation_ns is None
    assert before.note == "not readable here: thermal violations"
    # The power-violation total grew by 2 ms between the readings: a throttled timing.
    assert cardstate.throttle_verdict(before, after) == \
        (True, "power-limited for 2.0 ms during the timing")


# --- what a timed case carries ----------------------------------------------------

def test_a_timed_case_records_its_seed_sampling_and_card_state():
    job = make_job([case("c", seed=42)], [SDPA_MATH],
                   timing={"warmup": 1, "repetitions": 40, "max_seconds": 5,
                           "min_repetitions": 8, "target_ci_rel": 0.5})
    result = run_case(job, job.cases[0], job.implementations[0], "cpu",
                      logging.getLogger("sparsek.runner.test"))
    assert result.status == "ok" and result.input_seed == 42
    timing = result.timing
    assert timing.stop_reason in ("ci", "repetitions") and timing.stats.n >= 8
    assert timing.target_ci_rel == 0.5 and timing.rotation_sets == 1
    assert result.card_before.source == result.card_after.source == "unavailable"
    assert result.throttled is None and result.throttle_detail is None


# --- on a GPU ---------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
def test_short_calls_are_timed_by_graph_replay_over_the_input_sets():
    copies = [torch.randn(4096, device="cuda") for _ in range(3)]
    calls = [lambda t=t: t.mul(2.0) for t in copies]
    timing = measure(calls[0], policy(warmup=3, repetitions=300, max_seconds=2), "cuda",
                     rotation=calls[1:])
    assert timing.method == "cuda-graph" and timing.graph_fallback is None
    assert timing.calls_per_sample >= 2 and timing.rotation_sets == 3
    assert 0 < timing.stats.median_ms < 0.02


@pytest.mark.gpu
@needs_gpu
def test_long_calls_and_uncapturable_calls_are_timed_with_events():
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    long = measure(lambda: a @ a, policy(warmup=2, repetitions=50, max_seconds=2), "cuda")
    assert long.method == "cuda-events" and long.stats.median_ms > 0.02
    small = torch.ones(16, device="cuda")
    # The threshold is raised so capture is tried: a synced call is paced by the host.
    synced = measure(lambda: small.sum().item(), policy(warmup=2, repetitions=20,
                                                        max_seconds=2, graph_below_us=1e5),
                     "cuda")
    assert synced.method == "cuda-events"
    assert synced.graph_fallback.startswith("CUDA graph capture failed")


@pytest.mark.gpu
@needs_gpu
def test_a_call_slow_to_queue_is_timed_by_its_gpu_work_not_the_hosts_pace():
    # 2 ms of host work before a kernel of a few microseconds: without the head start
    # each event pair would hold the host's 2 ms.
    x = torch.randn(1 << 20, device="cuda")

    def slow_to_queue():
        time.sleep(0.002)
        return x.mul(2.0)

    timing = measure(slow_to_queue, policy(warmup=2, repetitions=30, max_seconds=5,
                                           graph_below_us=0), "cuda")
    assert timing.method == "cuda-events"
    assert timing.host_enqueue_ms >= 2.0 and timing.head_start_us >= 4000
    assert timing.stats.median_ms < 0.5 and timing.host_bound


@pytest.mark.gpu
@needs_gpu
def test_the_gpu_state_is_read():
    reader = cardstate.open_reader("cuda", 0)
    try:
        reading = reader.read()
    finally:
        reader.close()
    assert reading.source in ("nvml", "nvidia-smi"), reading.note
    assert reading.sm_clock_mhz and reading.sm_clock_mhz > 0
