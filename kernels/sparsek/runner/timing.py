"""Timing of one prepared call: warm-up, then rounds of samples until the median is
known well enough, the sample cap is reached or the time budget is spent.

On CUDA (see cuda_timing) each sample is a pair of CUDA events around one call with
the L2 flushed before it, or, for calls too short for that, one replay of a CUDA
graph of many calls. On the CPU each sample is a wall-clock interval around one call.
Calls cycle over the input sets given (the original and copies at other addresses).
Every sample is kept, so a report can show the spread.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import torch

from sparsek.runner.sampling import round_size, stop_reason, warmup_chunk
from sparsek.runner.stats import relative_ci, summarize
from sparsek_remote.jobspec import TimingPolicy
from sparsek_remote.schema import Timing

Call = Callable[[], object]
TakeSamples = Callable[[int], list[float]]


def measure(call: Call, policy: TimingPolicy, device: str, *,
            rotation: Sequence[Call] = ()) -> Timing:
    """Warm up, take samples and summarize them. ``rotation`` holds the same call on
    other copies of the inputs; samples cycle over ``call`` and those."""
    calls = [call, *rotation]
    policy = policy.for_device(device)
    if device == "cuda":
        from sparsek.runner.cuda_timing import measure_cuda

        return measure_cuda(calls, policy)
    samples, reason, warmed = _wall_clock_samples(calls, policy)
    return Timing(method="wall-clock", device=device, warmup=warmed, l2_flushed=False,
                  samples_ms=samples, stats=summarize(samples), rotation_sets=len(calls),
                  stop_reason=reason, target_ci_rel=policy.target_ci_rel)


def collect(take: TakeSamples, policy: TimingPolicy, *, taken: Sequence[float] = (),
            started: float | None = None) -> tuple[list[float], str]:
    """Call ``take(k)`` for rounds of k new samples (ms) until sampling.stop_reason
    says stop; returns every sample and that reason. ``taken`` are samples already
    made since ``started`` (a perf_counter reading; default now)."""
    samples = list(taken)
    begin = time.perf_counter() if started is None else started
    while True:
        elapsed = time.perf_counter() - begin
        reason = stop_reason(len(samples), relative_ci(samples), elapsed, policy)
        if reason is not None:
            return samples, reason
        # What a sample costs in wall time, overheads included, sizes the next round.
        per_sample = elapsed / len(samples) if samples else 0.0
        samples += take(round_size(len(samples), per_sample, elapsed, policy))


def warm_up(run: Callable[[int], None], policy: TimingPolicy, *,
            clock: Callable[[], float] = time.perf_counter) -> int:
    """Warm-up of at least ``policy.warmup`` calls and ``policy.warmup_seconds``
    (resolved, see TimingPolicy.for_device); ``run(k)`` makes k calls and returns once
    they are done. Returns the number of calls made."""
    if not policy.warmup and not policy.warmup_seconds:
        return 0
    run(1)  # the first call may compile or tune, so the clock starts after it
    done, chunk, begin = 1, 2, clock()
    while k := warmup_chunk(done, chunk, clock() - begin < (policy.warmup_seconds or 0.0),
                            policy):
        run(k)
        done, chunk = done + k, 2 * k
    return done


def _wall_clock_samples(calls: list[Call], policy: TimingPolicy
                        ) -> tuple[list[float], str, int]:
    cycle = itertools.cycle(calls)

    def run(k: int) -> None:
        for _ in range(k):
            next(cycle)()

    warmed = warm_up(run, policy)

    def take(k: int) -> list[float]:
        out = []
        for _ in range(k):
            call = next(cycle)
            begin = time.perf_counter()
            call()
            out.append((time.perf_counter() - begin) * 1e3)
        return out

    return (*collect(take, policy), warmed)


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
