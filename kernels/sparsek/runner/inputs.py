"""Fresh random inputs of one case, reproducible from its seed.

Never zeros or constants: an all-zero input hides unwritten outputs and wrong
indexing, since every row then has the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsek_remote.jobspec import Case

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Inputs:
    """``q [B, Hq, S, D]``, ``k, v [B, Hkv, S, D]`` in the case dtype, ``u [B, Hkv, S]`` fp32."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor

    def to(self, dtype: torch.dtype) -> Inputs:
        """The same values with q, k, v in ``dtype`` (u stays as it is)."""
        return Inputs(self.q.to(dtype), self.k.to(dtype), self.v.to(dtype), self.u)


def torch_dtype(case: Case) -> torch.dtype:
    return TORCH_DTYPES[case.dtype]


def make_inputs(case: Case, device: str) -> Inputs:
    """Standard normal q, k, v, u drawn in that order from a generator seeded by the case."""
    generator = torch.Generator(device=device).manual_seed(case.seed)
    dtype = torch_dtype(case)

    def draw(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    q = draw(case.B, case.Hq, case.S, case.D, dtype=dtype)
    k = draw(case.B, case.Hkv, case.S, case.D, dtype=dtype)
    v = draw(case.B, case.Hkv, case.S, case.D, dtype=dtype)
    u = draw(case.B, case.Hkv, case.S, dtype=torch.float32)
    return Inputs(q=q, k=k, v=v, u=u)
