"""The card's own ceilings, measured once per job: what a large matrix product
reaches (TFLOP/s, per dtype the job uses) and what a large device-to-device copy
moves (GB/s, bytes read plus written).

A datasheet's peak is never reached and differs between boards and clocks; a case's
rate is easier to judge against what this card, at these clocks, just did. Each
ceiling is the median of timed repetitions after warm-up.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable

import torch

from sparsek.runner.inputs import TORCH_DTYPES
from sparsek_remote.schema import Ceilings

# Large enough to fill an H100 (n = 8192 is about 1.1 TFLOP per product; 1 GiB is
# twenty times its L2); on the CPU small, since there it only shows the loop works.
MATMUL_N = {"cuda": 8192, "cpu": 256}
COPY_BYTES = {"cuda": 2**30, "cpu": 16 * 2**20}
WARMUP = 3
REPEATS = {"cuda": 10, "cpu": 3}


def measure_ceilings(device: str, dtypes: Iterable[str], log: logging.Logger
                     ) -> Ceilings | None:
    """Ceilings for ``dtypes`` (names as in a job's cases) on ``device``; None, with a
    warning in ``log``, if they cannot be measured (the job goes on without them)."""
    try:
        matmul = {name: _matmul_tflops(device, name) for name in sorted(set(dtypes))}
        copy = _copy_gbps(device)
    except (RuntimeError, MemoryError) as exc:
        log.warning("the card's ceilings could not be measured, so the report shows no "
                    "fraction of peak: %s: %s", type(exc).__name__, exc)
        return None
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    tf32 = device == "cuda" and torch.backends.cuda.matmul.allow_tf32
    method = (f"median of {REPEATS[device]} after {WARMUP} warm-up: torch.matmul of two "
              f"{MATMUL_N[device]}x{MATMUL_N[device]} random matrices per dtype"
              f"{' (float32 through TF32)' if tf32 else ''}; Tensor.copy_ of "
              f"{COPY_BYTES[device] // 2**20} MiB, counting bytes read and written")
    ceilings = Ceilings(device=device, matmul_tflops=matmul, copy_gbps=copy, method=method)
    log.info("ceilings on %s: matmul %s TFLOP/s, copy %.4g GB/s", device,
             ", ".join(f"{k} {v:.4g}" for k, v in matmul.items()), copy)
    return ceilings


def _matmul_tflops(device: str, dtype_name: str) -> float:
    n = MATMUL_N[device]
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator, device=device,
                        dtype=TORCH_DTYPES[dtype_name]) for _ in range(2))
    ms = _median_ms(lambda: torch.matmul(a, b), device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _copy_gbps(device: str) -> float:
    count = COPY_BYTES[device] // 4
    src = torch.ones(count, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device)
    return 2 * COPY_BYTES[device] / (ms * 1e-3) / 1e9


def _median_ms(fn: Callable[[], object], device: str) -> float:
    for _ in range(WARMUP):
        fn()
    if device != "cuda":
        samples = []
        for _ in range(REPEATS[device]):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(samples)
    pairs = []
    for _ in range(REPEATS[device]):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)
