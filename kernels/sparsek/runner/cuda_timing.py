"""The CUDA side of timing: event pairs around single calls, or graph replays.

Decisions (graph or not, graph size, rounds, stopping, head start) come from
sampling.py; this module only carries them out. After warm-up, the host's time to
queue one call is measured. Every event-timed sample is then preceded by a GPU spin
(the head start) longer than that, so the host has queued the whole call before the
first event fires: a call made of many launches (or a slow dispatcher) would otherwise
be timed at the host's pace, and that pace varies from run to run. A few such samples
estimate one call's time. A call shorter than the policy's graph threshold is then
timed by replaying a CUDA graph of many calls (cycling over the input sets, which is
what keeps a graph's later calls from reading a warm L2), one replay per sample,
divided by the number of calls. If capture fails, the event pairs are kept and the
reason is recorded.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from sparsek.runner.sampling import MIN_SAMPLES, calls_per_replay, head_start_us, should_use_graph
from sparsek.runner.stats import summarize
from sparsek.runner.timing import Call, collect, warm_up
from sparsek_remote.jobspec import TimingPolicy
from sparsek_remote.schema import Timing

L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 of any current GPU (H100: 50 MiB)
_REASON_CHARS = 500
_HOST_PROBES = 3  # calls whose host time alone is measured, after the warm-up
_CALIBRATION_CYCLES = 2_000_000  # about 1 ms of spin on current GPUs


def measure_cuda(calls: list[Call], policy: TimingPolicy) -> Timing:
    flush = _l2_flusher(policy.flush_l2)
    cycle = itertools.cycle(calls)

    def run(k: int) -> None:
        for _ in range(k):
            flush()
            next(cycle)()
        torch.cuda.synchronize()

    warmed = warm_up(run, policy)
    host_ms = _host_enqueue_ms(cycle, flush)
    hold = _head_start(head_start_us(host_ms * 1e3))
    extra = {"host_enqueue_ms": host_ms, "head_start_us": hold.us, "warmup": warmed}
    started = time.perf_counter()
    probe = _event_samples(cycle, flush, hold, MIN_SAMPLES)
    median_us = statistics.median(probe) * 1e3
    fallback = None
    if should_use_graph(median_us, policy):
        per_replay = calls_per_replay(median_us, policy)
        graph, fallback = _try_capture(calls, per_replay)
        if graph is not None:
            samples, reason = collect(lambda k: _replay_samples(graph, flush, k, per_replay),
                                      policy)
            return _timing("cuda-graph", samples, reason, policy, calls, per_replay, None,
                           host_enqueue_ms=host_ms, warmup=warmed)
    samples, reason = collect(lambda k: _event_samples(cycle, flush, hold, k), policy,
                              taken=probe, started=started)
    return _timing("cuda-events", samples, reason, policy, calls, 1, fallback, **extra)


def _timing(method: str, samples: list[float], reason: str, policy: TimingPolicy,
            calls: list[Call], per_sample: int, fallback: str | None,
            **extra: float | int | None) -> Timing:
    return Timing(method=method, device="cuda",
                  l2_flushed=policy.flush_l2, samples_ms=samples, stats=summarize(samples),
                  calls_per_sample=per_sample, rotation_sets=len(calls), stop_reason=reason,
                  target_ci_rel=policy.target_ci_rel, graph_fallback=fallback, **extra)


def _host_enqueue_ms(cycle: Iterator[Call], flush: Callable[[], None]) -> float:
    """Median host time to queue one call (with the L2 flush before it), each measured
    with the GPU idle so earlier work cannot block the launch. A call that waits for
    the GPU itself (a host sync) counts that wait too."""
    times = []
    for _ in range(_HOST_PROBES):
        call = next(cycle)
        begin = time.perf_counter()
        flush()
        call()
        times.append((time.perf_counter() - begin) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


class _HeadStart:
    """Queues a GPU spin of ``us`` microseconds (a kernel that counts clock cycles)."""

    def __init__(self, us: float, cycles_per_us: float) -> None:
        self.us = us
        self._cycles = max(1, int(us * cycles_per_us))

    def __call__(self) -> None:
        torch.cuda._sleep(self._cycles)


def _head_start(us: float) -> _HeadStart:
    return _HeadStart(us, _cycles_per_us(torch.cuda.current_device()))


@functools.cache
def _cycles_per_us(device: int) -> float:
    """The spin kernel's clock rate, measured once per device: it counts SM cycles,
    and the SM clock varies with the card and its boost."""
    del device  # the cache key; the spin runs on the current device
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(_CALIBRATION_CYCLES // 10)  # wake the clocks first
    start.record()
    torch.cuda._sleep(_CALIBRATION_CYCLES)
    end.record()
    torch.cuda.synchronize()
    return _CALIBRATION_CYCLES / max(start.elapsed_time(end) * 1e3, 1.0)


def _event_samples(cycle: Iterator[Call], flush: Callable[[], None], hold: _HeadStart,
                   k: int) -> list[float]:
    """k calls, each between two events with the head start and the L2 flush before
    them (outside the events); queued without waiting, so the GPU never waits for the
    host inside a sample."""
    pairs = []
    for _ in range(k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        call = next(cycle)
        hold()
        flush()
        start.record()
        call()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def _replay_samples(graph: torch.cuda.CUDAGraph, flush: Callable[[], None], k: int,
                    per_replay: int) -> list[float]:
    pairs = []
    for _ in range(k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush()
        start.record()
        graph.replay()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / per_replay for start, end in pairs]


def _try_capture(calls: list[Call], per_replay: int
                 ) -> tuple[torch.cuda.CUDAGraph | None, str | None]:
    """A graph of ``per_replay`` calls cycling over ``calls``, or (None, why not): an
    implementation that waits for the host or allocates outside PyTorch cannot be
    captured, and is then timed with events instead."""
    try:
        return _capture(calls, per_replay), None
    except RuntimeError as exc:
        torch.cuda.synchronize()
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:_REASON_CHARS]
        return None, f"CUDA graph capture failed, timed with events instead: {why}"


def _capture(calls: list[Call], per_replay: int) -> torch.cuda.CUDAGraph:
    # Capture needs work already warmed up on a side stream (lazy initialisation of
    # handles and workspaces must not happen inside the capture).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_replay):
            calls[i % len(calls)]()
    torch.cuda.synchronize()
    return graph


def _l2_flusher(enabled: bool) -> Callable[[], None]:
    if not enabled:
        return lambda: None
    buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return buffer.zero_
