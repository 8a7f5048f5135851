"""The fused Triton forward on a CUDA GPU: the contract's correctness bar on every test
shape and on the three benchmark shapes (sampled query rows, through the runner's own
gate), poisoned outputs, repeatability, and ``torch.compile`` without graph breaks.
Skipped where PyTorch sees no CUDA device.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from sparsek.reference import sparsek_mask
from tests.kernels.triton_check import (
    check_against_reference,
    forward,
    rel,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def untuned(monkeypatch):
    """The default attention tile: tuning every test shape would cost minutes of compiles.
    Every tile the tuner may pick is tested on its own below, and the benchmark shapes
    go through the tuner as a benchmark run does."""
    from sparsek import triton_fwd

    monkeypatch.setattr(triton_fwd, "TUNE", False)


# (B, Hq, Hkv, S, D, K, W, causal, dtype): the interpreter's cases and larger ones that
# span many blocks, chunks and list lengths on the GPU's own tile sizes.
CASES = [
    (1, 1, 1, 1, 64, 1, 1, True, F32),
    (1, 2, 2, 1, 64, 0, 0, False, BF16),
    (1, 4, 1, 63, 64, 7, 16, True, BF16),
    (1, 4, 1, 63, 64, 7, 16, False, F16),
    (1, 2, 2, 100, 64, 1, 0, True, F32),
    (1, 2, 2, 100, 64, 1, 0, False, BF16),
    (1, 8, 1, 100, 128, 7, 1, True, BF16),
    (1, 8, 1, 100, 128, 7, 1, False, F16),
    (1, 1, 1, 63, 128, 0, 16, True, F16),
    (1, 1, 1, 63, 64, 0, 0, True, F32),
    (2, 2, 1, 257, 64, 7, 16, True, BF16),
    (1, 4, 1, 257, 128, 33, 1, False, BF16),
    (1, 1, 1, 257, 64, 300, 0, True, F32),
    (1, 4, 4, 63, 64, 7, 100, False, F32),
    (2, 8, 2, 1000, 128, 100, 33, True, BF16),
    (2, 8, 2, 1000, 128, 100, 33, False, BF16),
    (1, 4, 1, 3001, 64, 257, 130, True, F16),
    (1, 2, 2, 2048, 128, 512, 64, False, F32),
    (1, 8, 1, 4099, 128, 1000, 200, True, BF16),
    (1, 4, 2, 1500, 128, 100, 300, False, BF16),  # keys in every query's window
]


@pytest.mark.parametrize(("B", "Hq", "Hkv", "S", "D", "K", "W", "causal", "dtype"), CASES)
def test_forward_matches_reference(make_inputs, B, Hq, Hkv, S, D, K, W, causal, dtype):
    x = make_inputs(batch=B, q_heads=Hq, kv_heads=Hkv, seq_len=S, dim=D, dtype=dtype,
                    device="cuda")
    check_against_reference(x, dtype, kv_budget=K, window=W, causal=causal, scale=None)


@pytest.mark.parametrize("causal", [True, False])
def test_more_rows_than_a_second_grid_dimension_holds(make_inputs, causal):
    # 65600 (batch, kv head) rows: over the 65535 programs a CUDA grid's second dimension
    # launches, so every kernel must take its rows in the first.
    x = make_inputs(batch=16400, q_heads=4, kv_heads=4, seq_len=24, dim=64, dtype=BF16,
                    device="cuda")
    check_against_reference(x, BF16, kv_budget=5, window=3, causal=causal, scale=None)


# (Hq, Hkv, S, D, K, W, causal, dtype): the shapes every tuner tile is checked on, causal
# GQA at D = 128 and non-causal at D = 64.
TILE_CASES = [
    (8, 2, 1000, 128, 100, 33, True, BF16),
    (4, 4, 700, 64, 50, 9, False, F16),
]


@pytest.mark.parametrize("tile", range(7))
@pytest.mark.parametrize(("Hq", "Hkv", "S", "D", "K", "W", "causal", "dtype"), TILE_CASES)
def test_every_attention_tile_the_tuner_may_pick_matches_reference(
        make_inputs, monkeypatch, tile, Hq, Hkv, S, D, K, W, causal, dtype):
    import dataclasses

    from sparsek import triton_fwd
    from sparsek.triton_attn import ATTN_CONFIGS

    assert len(ATTN_CONFIGS) == 7, "the tile parameter must cover every config"
    chosen = ATTN_CONFIGS[tile]
    default = triton_fwd.default_config

    def with_tile(q, group):
        return dataclasses.replace(default(q, group), block_n=chosen.kwargs["BN"],
                                   num_warps=chosen.num_warps, num_stages=chosen.num_stages,
                                   max_registers=chosen.maxnreg)

    monkeypatch.setattr(triton_fwd, "default_config", with_tile)
    x = make_inputs(batch=1, q_heads=Hq, kv_heads=Hkv, seq_len=S, dim=D, dtype=dtype,
                    device="cuda")
    check_against_reference(x, dtype, kv_budget=K, window=W, causal=causal, scale=None)


def _gluon():
    """The Gluon kernel's module, or a skip where it cannot run. (Imported in the test,
    not at collection, so that the interpreter tests still import the kernel modules in
    interpreter mode.)"""
    from sparsek import triton_fwd

    if triton_fwd.gluon_attention() is None or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel runs on Hopper (sm_90) only")
    return triton_fwd.gluon_attention()


def _force_gluon(monkeypatch, q, group, tile):
    """Make the forward use the Gluon attention kernel with tile (keys, slots, register
    cap); skip where that kernel does not serve the default blocks of q."""
    import dataclasses

    from sparsek import triton_fwd

    gluon_attn = _gluon()
    default = triton_fwd.default_config
    cfg = default(q, group)
    if not gluon_attn.supported(q, math.gcd(cfg.heads, group) * cfg.block_m):
        pytest.skip("the Gluon kernel serves float16/bfloat16 with 64 or 128 rows a program")
    block_n, stages, cap = tile

    def with_gluon(q, group):
        return dataclasses.replace(default(q, group), kernel="gluon", block_n=block_n,
                                   num_stages=stages, max_registers=cap)

    monkeypatch.setattr(triton_fwd, "default_config", with_gluon)


@pytest.mark.parametrize(("B", "Hq", "Hkv", "S", "D", "K", "W", "causal", "dtype"),
                         [c for c in CASES if c[-1] != F32])
def test_gluon_attention_matches_reference(make_inputs, monkeypatch, B, Hq, Hkv, S, D, K, W,
                                           causal, dtype):
    x = make_inputs(batch=B, q_heads=Hq, kv_heads=Hkv, seq_len=S, dim=D, dtype=dtype,
                    device="cuda")
    _force_gluon(monkeypatch, x.q, Hq // Hkv, (32, 3, None))
    check_against_reference(x, dtype, kv_budget=K, window=W, causal=causal, scale=None)


def test_gluon_with_fewer_than_three_slots_is_refused_before_anything_runs(make_inputs,
                                                                         monkeypatch):
    from sparsek import triton_fwd

    x = make_inputs(batch=1, q_heads=4, kv_heads=1, seq_len=100, dim=64, dtype=BF16,
                    device="cuda")
    _force_gluon(monkeypatch, x.q, 4, (32, 2, None))
    o = torch.full_like(x.q, float("nan"))
    with pytest.raises(ValueError, match="at least 3 shared-memory slots"):
        triton_fwd.launch_forward(x.q, x.k, x.v, x.u, 7, 4, True, 0.125, o,
                                  torch.empty(x.q.shape[:3], device="cuda"))
    assert o.isnan().all()


@pytest.mark.parametrize("tile", range(4))
@pytest.mark.parametrize(("Hq", "Hkv", "S", "D", "K", "W", "causal", "dtype"), TILE_CASES)
def test_every_gluon_tile_the_tuner_may_pick_matches_reference(
        make_inputs, monkeypatch, tile, Hq, Hkv, S, D, K, W, causal, dtype):
    configs = _gluon().GLUON_CONFIGS
    assert len(configs) == 4, "the tile parameter must cover every config"
    x = make_inputs(batch=1, q_heads=Hq, kv_heads=Hkv, seq_len=S, dim=D, dtype=dtype,
                    device="cuda")
    _force_gluon(monkeypatch, x.q, Hq // Hkv, configs[tile])
    check_against_reference(x, dtype, kv_budget=K, window=W, causal=causal, scale=None)


def _force_ws(monkeypatch, q, group, tile, rows=128):
    """Make the forward use the warp-specialized kernel with tile (keys, ring slots) on
    blocks of `rows` rows (the default heads a program, and as many queries as make
    `rows`); skip where it cannot run."""
    import dataclasses

    from sparsek import triton_fwd

    _gluon()
    ws_attn = triton_fwd.ws_attention()
    if ws_attn is None:
        pytest.skip("this Triton build has no Gluon warp specialization")
    default = triton_fwd.default_config
    heads = math.gcd(default(q, group).heads, group)
    if not ws_attn.supported(q, rows):
        pytest.skip("the warp-specialized kernel serves float16/bfloat16")
    block_n, stages = tile

    def with_ws(q, group):
        return dataclasses.replace(default(q, group), kernel="ws", block_n=block_n,
                                   num_stages=stages, block_m=rows // heads)

    monkeypatch.setattr(triton_fwd, "default_config", with_ws)


@pytest.mark.parametrize("rows", [128, 64])
@pytest.mark.parametrize(("B", "Hq", "Hkv", "S", "D", "K", "W", "causal", "dtype"),
                         [c for c in CASES if c[-1] != F32])
def test_ws_attention_matches_reference(make_inputs, monkeypatch, B, Hq, Hkv, S, D, K, W,
                                        causal, dtype, rows):
    x = make_inputs(batch=B, q_heads=Hq, kv_heads=Hkv, seq_len=S, dim=D, dtype=dtype,
                    device="cuda")
    _force_ws(monkeypatch, x.q, Hq // Hkv, (64, 4 if rows == 128 else 2), rows)
    check_against_reference(x, dtype, kv_budget=K, window=W, causal=causal, scale=None)


@pytest.mark.parametrize("rows", [128, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_ws_attention_rescales_the_rows_whose_maximum_jumps(make_inputs, monkeypatch, rows,
                                                             causal):
    # The warp-specialized kernel moves a row's running maximum only when a tile's exceeds
    # it by more than 2 ** 8, and a warp none of whose rows moved skips the rescaling. Keys
    # that grow along the list (lower scores, longer keys) and queries of two very
    # different lengths make some rows' maxima jump many times and others' never: in one
    # warp, and in one warp but not the next.
    from sparsek.runner.inputs import Inputs

    x = make_inputs(batch=1, q_heads=8, kv_heads=2, seq_len=1500, dim=128, device="cuda")
    rank = x.u.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0: the highest score
    k = x.k * (1 + 6 * rank / x.u.shape[-1])[..., None]
    long = torch.rand(x.q.shape[:3], generator=torch.Generator().manual_seed(1)) < 0.15
    q = x.q * torch.where(long, 3.0, 0.05).to(x.q)[..., None]
    x = Inputs(q, k, x.v, x.u).to(BF16)
    _force_ws(monkeypatch, x.q, 4, (64, 4 if rows == 128 else 2), rows)
    check_against_reference(x, BF16, kv_budget=300, window=64, causal=causal, scale=None)


# How many tiles gluon_ws_attn.WS_CONFIGS lists for each program size (checked below, so
# the parameters cover every one; the module is not imported while tests are collected).
WS_TILES = {128: 2, 64: 2}


@pytest.mark.parametrize(("rows", "tile"), [(r, t) for r, n in WS_TILES.items()
                                            for t in range(n)])
@pytest.mark.parametrize(("Hq", "Hkv", "S", "D", "K", "W", "causal", "dtype"), TILE_CASES)
def test_every_ws_tile_the_tuner_may_pick_matches_reference(
        make_inputs, monkeypatch, rows, tile, Hq, Hkv, S, D, K, W, causal, dtype):
    from sparsek import triton_fwd

    _gluon()
    configs = triton_fwd.ws_attention().WS_CONFIGS
    assert {rows: len(tiles) for rows, tiles in configs.items()} == WS_TILES, \
        "the rows and tile parameters must cover every config"
    x = make_inputs(batch=1, q_heads=Hq, kv_heads=Hkv, seq_len=S, dim=D, dtype=dtype,
                    device="cuda")
    _force_ws(monkeypatch, x.q, Hq // Hkv, configs[rows][tile][:2], rows)
    check_against_reference(x, dtype, kv_budget=K, window=W, causal=causal, scale=None)


@pytest.mark.parametrize("causal", [True, False])
def test_ws_attention_reads_inputs_that_start_off_a_16_byte_boundary(
        make_inputs, monkeypatch, causal):
    # The queries and the dense range's tiles come by TMA, whose descriptors need 16-byte
    # aligned bases; q, k and v here are contiguous views one element into their storage.
    from sparsek.runner.inputs import Inputs

    x = make_inputs(batch=2, q_heads=4, kv_heads=2, seq_len=300, dim=128, dtype=BF16,
                    device="cuda")
    q, k, v = (torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")[1:].view(t.shape)
               .copy_(t) for t in (x.q, x.k, x.v))
    assert all(t.is_contiguous() and t.data_ptr() % 16 != 0 for t in (q, k, v))
    x = Inputs(q, k, v, x.u)
    _force_ws(monkeypatch, x.q, 2, (64, 4), 128)
    check_against_reference(x, BF16, kv_budget=40, window=70, causal=causal, scale=None)


def test_ws_attention_writes_an_out_buffer_that_starts_off_a_16_byte_boundary(
        make_inputs, monkeypatch):
    # The kernel writes o by TMA (16-byte aligned bases only): an out that starts one
    # element into its storage is written through a buffer of the forward's own, and
    # gets exactly what an aligned one gets.
    from sparsek.triton_fwd import sparsek_attention_triton

    x = make_inputs(batch=1, q_heads=8, kv_heads=2, seq_len=700, dim=128, dtype=BF16,
                    device="cuda")
    _force_ws(monkeypatch, x.q, 4, (64, 4), 128)
    kw = dict(kv_budget=50, window=40, causal=True)
    want, want_lse = sparsek_attention_triton(x.q, x.k, x.v, x.u, **kw)
    out = torch.full((x.q.numel() + 1,), float("nan"), dtype=BF16, device="cuda")
    out = out[1:].view(x.q.shape)
    assert out.data_ptr() % 16 != 0
    o, lse = sparsek_attention_triton(x.q, x.k, x.v, x.u, out=out, **kw)
    assert o is out
    assert torch.equal(o, want) and torch.equal(lse, want_lse)


def test_ws_kernel_on_blocks_other_than_64_or_128_rows_is_refused_before_anything_runs(
        make_inputs, monkeypatch):
    import dataclasses

    from sparsek import triton_fwd

    _gluon()
    x = make_inputs(batch=1, q_heads=4, kv_heads=1, seq_len=100, dim=64, dtype=BF16,
                    device="cuda")
    default = triton_fwd.default_config
    monkeypatch.setattr(triton_fwd, "default_config", lambda q, group: dataclasses.replace(
        default(q, group), kernel="ws", block_m=16, heads=2))
    o = torch.full_like(x.q, float("nan"))
    with pytest.raises(ValueError, match="64 or 128 rows a program"):
        triton_fwd.launch_forward(x.q, x.k, x.v, x.u, 7, 4, True, 0.125, o,
                                  torch.empty(x.q.shape[:3], device="cuda"))
    assert o.isnan().all()


@pytest.mark.parametrize("causal", [True, False])
def test_ties_and_dense_limits(make_inputs, causal):
    x = make_inputs(q_heads=4, kv_heads=2, seq_len=700, dim=64, dtype=F32, u_levels=6,
                    device="cuda")
    check_against_reference(x, F32, kv_budget=50, window=9, causal=causal, scale=0.2)
    o, _ = forward(x, kv_budget=700, window=0, causal=causal, scale=None)
    x64 = x.to(torch.float64)
    want = F.scaled_dot_product_attention(x64.q, x64.k, x64.v, is_causal=causal,
                                          enable_gqa=True)
    assert rel(o, want) < 1e-5


# The causal selection's paths: the per-row scan (forced even for few rows), the scan
# giving rows back (at most one piece end a new score), which the boundary and per-query
# kernels then solve, and the per-query kernels alone (scan off).
PATHS = [(False, "per-block"), (True, "scan"), (True, "scan, rows redone"), (True, "per-query")]


def _force_path(monkeypatch, path: str) -> None:
    from sparsek import triton_fwd

    if path.startswith("scan"):
        monkeypatch.setattr(triton_fwd, "SCAN_MIN_ROWS", 1)
    if path == "scan, rows redone":
        monkeypatch.setattr(triton_fwd, "SCAN_MAX_ENDS", 1)
    elif path == "per-query":
        monkeypatch.setattr(triton_fwd, "SCAN_MAX_BUDGET", -1)


@pytest.mark.parametrize(("B", "Hq", "Hkv", "S", "D", "K", "W", "causal", "dtype"), [
    (2, 8, 2, 1000, 128, 100, 33, True, BF16),
    (2, 4, 2, 4096, 128, 256, 256, True, BF16),
    (1, 2, 1, 777, 64, 200, 0, True, F16),
])
@pytest.mark.parametrize("path", ["scan", "scan, rows redone"])
def test_forward_through_the_scan_matches_reference(make_inputs, monkeypatch, B, Hq, Hkv, S,
                                                    D, K, W, causal, dtype, path):
    _force_path(monkeypatch, path)
    x = make_inputs(batch=B, q_heads=Hq, kv_heads=Hkv, seq_len=S, dim=D, dtype=dtype,
                    device="cuda")
    check_against_reference(x, dtype, kv_budget=K, window=W, causal=causal, scale=None)


@pytest.mark.parametrize(("causal", "path"), PATHS)
@pytest.mark.parametrize("pattern", ["increasing", "decreasing", "constant", "ties", "random"])
def test_selection_matches_the_mask(seed, monkeypatch, pattern, causal, path):
    from sparsek.triton_fwd import default_config, select

    _force_path(monkeypatch, path)
    S, K, W = 1500, 97, 40
    g = torch.Generator().manual_seed(seed)
    u = {"increasing": torch.arange(S).float() * 0.01,
         "decreasing": -torch.arange(S).float() * 0.01,
         "constant": torch.full((S,), 0.7),
         "ties": torch.randint(0, 5, (S,), generator=g).float() * 0.25,
         "random": torch.randn(S, generator=g) * 2}[pattern]
    u = u.expand(1, 2, S).contiguous().cuda()
    q = torch.empty(1, 2, S, 128, device="cuda", dtype=BF16)
    sel = select(u, K, W, causal, default_config(q, 1))
    mask = sparsek_mask(u, kv_budget=K, window=W, causal=causal)
    want = mask.tau.reshape(-1, S)
    kept_all = torch.isneginf(want)
    assert torch.equal(torch.isneginf(sel.tau), kept_all)
    err = (sel.tau.double() - want)[~kept_all].abs().max()
    assert float(err) <= 4e-7 * max(1.0, float(u.abs().max()))
    # The cut is the K-th best candidate: its rank in the sort is at least K - 1.
    assert bool((sel.rk[~kept_all] >= K - 1).all())


def test_repeated_calls_give_identical_outputs(make_inputs):
    x = make_inputs(batch=2, q_heads=8, kv_heads=2, seq_len=3000, dim=128, dtype=BF16,
                    device="cuda")
    first = forward(x, kv_budget=300, window=100, causal=True, scale=None)
    for _ in range(3):
        again = forward(x, kv_budget=300, window=100, causal=True, scale=None)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


BENCHMARK_SHAPES = {
    "seed": dict(B=16, Hq=96, Hkv=96, S=512, D=64, causal=False, kv_budget=64, window=32),
    "gpt4-4k": dict(B=16, Hq=96, Hkv=96, S=4096, D=128, causal=True, kv_budget=256,
                    window=256),
    "long-64k": dict(B=1, Hq=32, Hkv=8, S=65536, D=128, causal=True, kv_budget=2048,
                     window=512),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BENCHMARK_SHAPES))
def test_benchmark_shapes_pass_the_runner_gate(monkeypatch, name):
    from sparsek import triton_fwd
    from sparsek.runner.gate import check
    from sparsek.runner.implementations import prepare
    from sparsek.runner.inputs import make_inputs
    from sparsek_remote.jobspec import Case, CorrectnessPolicy, SparsekImpl

    monkeypatch.setattr(triton_fwd, "TUNE", True)  # as a benchmark run has it
    case = Case(name=name, dtype="bfloat16", seed=11, **BENCHMARK_SHAPES[name])
    impl = SparsekImpl(kind="sparsek", impl="triton")
    log = logging.getLogger("test")
    inputs = make_inputs(case, "cuda")
    gate = check(CorrectnessPolicy(), case, impl, prepare(impl, case, inputs, "cuda", log),
                 inputs, log)
    assert gate.passed, gate.message


class _Attention(torch.nn.Module):
    def forward(self, q, k, v, u):
        from sparsek.triton_fwd import sparsek_attention_triton

        o, lse = sparsek_attention_triton(q, k, v, u, kv_budget=16, window=8, causal=True)
        return o * 2, lse


def test_torch_compile_traces_the_op_without_graph_breaks(make_inputs):
    x = make_inputs(q_heads=4, kv_heads=2, seq_len=300, dim=64, dtype=BF16, device="cuda")
    module = _Attention()
    compiled = torch.compile(module, fullgraph=True)
    got_o, got_lse = compiled(x.q, x.k, x.v, x.u)
    want_o, want_lse = module(x.q, x.k, x.v, x.u)
    assert torch.equal(got_o, want_o) and torch.equal(got_lse, want_lse)
