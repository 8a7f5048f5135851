"""Timing of one prepared call: warm-up, then samples until enough or time is up.

On CUDA each sample is a pair of CUDA events around one call, with the L2 cache
flushed before it (outside the events) so a small problem is not timed from a warm
cache it would not have inside a model. On the CPU each sample is a wall-clock
interval around one call. Every sample is kept, so a report can show the spread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from sparsek.runner.stats import summarize
from sparsek_remote.jobspec import TimingPolicy
from sparsek_remote.schema import Timing

L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 of any current GPU (H100: 50 MiB)
MIN_SAMPLES = 3

Call = Callable[[], object]


def measure(call: Call, policy: TimingPolicy, device: str) -> Timing:
    """Warm up, take samples and summarize them."""
    if device == "cuda":
        samples, method, flushed = _cuda_samples(call, policy), "cuda-events", policy.flush_l2
    else:
        samples, method, flushed = _wall_clock_samples(call, policy), "wall-clock", False
    return Timing(method=method, device=device, warmup=policy.warmup, l2_flushed=flushed,
                  samples_ms=samples, stats=summarize(samples))


def _wall_clock_samples(call: Call, policy: TimingPolicy) -> list[float]:
    for _ in range(policy.warmup):
        call()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < policy.repetitions:
        begin = time.perf_counter()
        call()
        end = time.perf_counter()
        samples.append((end - begin) * 1e3)
        if len(samples) >= MIN_SAMPLES and end - started >= policy.max_seconds:
            break
    return samples


def _cuda_samples(call: Call, policy: TimingPolicy) -> list[float]:
    flush = _l2_flusher(policy.flush_l2)
    for _ in range(policy.warmup):
        flush()
        call()
    torch.cuda.synchronize()
    # One synchronized sample measures what a whole iteration costs (flush included),
    # which fixes how many fit in max_seconds; the rest are queued without waiting,
    # so the host never stalls the GPU between samples.
    begin = time.perf_counter()
    first = _event_pair(call, flush)
    first[1].synchronize()
    per_iteration = time.perf_counter() - begin
    planned = _planned_samples(per_iteration, policy)
    pairs = [first]
    started = time.perf_counter()
    while len(pairs) < planned:
        if len(pairs) >= MIN_SAMPLES and time.perf_counter() - started >= policy.max_seconds:
            break
        pairs.append(_event_pair(call, flush))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def _planned_samples(per_iteration_s: float, policy: TimingPolicy) -> int:
    if per_iteration_s <= 0:
        return policy.repetitions
    fits = math.floor(policy.max_seconds / per_iteration_s)
    return max(MIN_SAMPLES, min(policy.repetitions, fits))


def _event_pair(call: Call, flush: Callable[[], None]
                ) -> tuple[torch.cuda.Event, torch.cuda.Event]:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    flush()
    start.record()
    call()
    end.record()
    return start, end


def _l2_flusher(enabled: bool) -> Callable[[], None]:
    if not enabled:
        return lambda: None
    buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return buffer.zero_


def peak_extra_memory(call: Call, device: str) -> int | None:
    """Device memory one call allocates beyond what is already held (inputs included
    in the latter); None on the CPU, where PyTorch keeps no such count."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    out = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - held
    del out
    return max(0, int(peak))
