"""Copies of a case's inputs at other addresses, so that timed calls can cycle over
them: inputs small enough to stay in the L2 would otherwise be read from it by every
call after the first, which is not how the kernel meets them inside a model.

The copies hold the very values the gate checked, so a timed call never runs on
data whose result nobody judged.
"""

from __future__ import annotations

import logging

import torch

from sparsek.runner.implementations import prepare
from sparsek.runner.inputs import Inputs
from sparsek.runner.metrics import case_bytes
from sparsek.runner.sampling import rotation_count
from sparsek.runner.timing import Call
from sparsek_remote.jobspec import Case, SdpaImpl, SparsekImpl, TimingPolicy


def l2_bytes(device: str) -> int | None:
    """The L2 size of the current GPU; None on the CPU."""
    if device != "cuda":
        return None
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)


def rotation_calls(impl: SparsekImpl | SdpaImpl, case: Case, inputs: Inputs, device: str,
                   policy: TimingPolicy) -> list[Call]:
    """The call bound to each extra copy of ``inputs`` that sampling.rotation_count
    asks for (none when one set is enough)."""
    count = rotation_count(case_bytes(case, impl), l2_bytes(device), policy)
    # Preparing a copy repeats what preparing the original already logged.
    quiet = logging.Logger("sparsek.runner.rotation", logging.WARNING)
    calls = []
    for _ in range(count - 1):
        copy = Inputs(*(t.clone() for t in (inputs.q, inputs.k, inputs.v, inputs.u)))
        calls.append(prepare(impl, case, copy, device, quiet).call)
    return calls
