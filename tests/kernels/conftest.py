"""Shared fixtures for the kernel tests: per-test seeds and random SparseK inputs."""

from __future__ import annotations

import zlib

import pytest
import torch

from sparsek.runner.inputs import Inputs


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A seed fixed per test (from its id): reproducible, yet different in every test."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def make_inputs(seed: int):
    """Factory for random inputs; ``u_levels`` rounds scores to few values to force ties."""

    def make(
        batch: int = 1,
        q_heads: int = 4,
        kv_heads: int = 2,
        seq_len: int = 33,
        dim: int = 16,
        dtype: torch.dtype = torch.float64,
        u_levels: int | None = None,
        device: str = "cpu",
    ) -> Inputs:
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(batch, q_heads, seq_len, dim, generator=gen, dtype=torch.float64)
        k = torch.randn(batch, kv_heads, seq_len, dim, generator=gen, dtype=torch.float64)
        v = torch.randn(batch, kv_heads, seq_len, dim, generator=gen, dtype=torch.float64)
        u = torch.randn(batch, kv_heads, seq_len, generator=gen) * 1.5
        if u_levels is not None:
            step = 4 / (u_levels - 1)
            u = torch.round((u.clamp(-2, 2) + 2) / step) * step - 2
        return Inputs(*(t.to(device) for t in (q, k, v, u))).to(dtype)

    return make


@pytest.fixture
def poisoned():
    """Output buffers filled with NaN, so an element a kernel never writes fails the test."""

    def make(like: torch.Tensor) -> torch.Tensor:
        return torch.full_like(like, torch.nan)

    return make
