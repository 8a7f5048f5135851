"""The CUDA side of timing: event pairs around single calls, or graph replays.

Decisions (graph or not, graph size, rounds, stopping) come from sampling.py; this
module only carries them out. After warm-up, a few synchronized event-timed calls
estimate one call's time. A call shorter than the policy's graph threshold is then
timed by replaying a CUDA graph of many calls (cycling over the input sets, which is
what keeps a graph's later calls from reading a warm L2), one replay per sample,
divided by the number of calls. If capture fails, the event pairs are kept and the
reason is recorded.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from sparsek.runner.sampling import MIN_SAMPLES, calls_per_replay, should_use_graph
from sparsek.runner.stats import summarize
from sparsek.runner.timing import Call, collect
from sparsek_remote.jobspec import TimingPolicy
from sparsek_remote.schema import Timing

L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 of any current GPU (H100: 50 MiB)
_REASON_CHARS = 500


def measure_cuda(calls: list[Call], policy: TimingPolicy) -> Timing:
    flush = _l2_flusher(policy.flush_l2)
    cycle = itertools.cycle(calls)
    for _ in range(policy.warmup):
        flush()
        next(cycle)()
    torch.cuda.synchronize()
    started = time.perf_counter()
    probe = _event_samples(cycle, flush, MIN_SAMPLES)
    median_us = statistics.median(probe) * 1e3
    fallback = None
    if should_use_graph(median_us, policy):
        per_replay = calls_per_replay(median_us, policy)
        graph, fallback = _try_capture(calls, per_replay)
        if graph is not None:
            samples, reason = collect(lambda k: _replay_samples(graph, flush, k, per_replay),
                                      policy)
            return _timing("cuda-graph", samples, reason, policy, calls, per_replay, None)
    samples, reason = collect(lambda k: _event_samples(cycle, flush, k), policy,
                              taken=probe, started=started)
    return _timing("cuda-events", samples, reason, policy, calls, 1, fallback)


def _timing(method: str, samples: list[float], reason: str, policy: TimingPolicy,
            calls: list[Call], per_sample: int, fallback: str | None) -> Timing:
    return Timing(method=method, device="cuda", warmup=policy.warmup,
                  l2_flushed=policy.flush_l2, samples_ms=samples, stats=summarize(samples),
                  calls_per_sample=per_sample, rotation_sets=len(calls), stop_reason=reason,
                  target_ci_rel=policy.target_ci_rel, graph_fallback=fallback)


def _event_samples(cycle: Iterator[Call], flush: Callable[[], None], k: int) -> list[float]:
    """k calls, each between two events with the L2 flushed before (outside them);
    queued without waiting, so the host never stalls the GPU between samples."""
    pairs = []
    for _ in range(k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        call = next(cycle)
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
