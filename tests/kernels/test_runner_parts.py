"""The runner's parts on their own: statistics, work counts, the gate's rows and
oracle, CPU timing, and the in-process case API."""

from __future__ import annotations

import itertools
import json
import logging
import random
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparsek
from sparsek.runner import gate, run_case
from sparsek.runner.events import case_done, done, json_lines
from sparsek.runner.implementations import prepare
from sparsek.runner.inputs import Inputs, make_inputs
from sparsek.runner.metrics import attended_pairs, case_bytes, case_flops, dense_pairs
from sparsek.runner.oracles import dense_rows
from sparsek.runner.stats import median_confidence_interval, summarize
from sparsek.runner.timing import measure, peak_extra_memory
from sparsek_remote.jobspec import Case, SdpaImpl, SparsekImpl, TimingPolicy
from tests.kernels.runner_jobs import SDPA_CUDNN, SDPA_MATH, SPARSEK_REFERENCE, case, make_job

LOG = logging.getLogger("sparsek.runner.test")


# --- statistics -------------------------------------------------------------------

def test_stats_of_an_odd_sample():
    stats = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (stats.n, stats.median_ms, stats.mean_ms) == (5, 3.0, 3.0)
    assert (stats.min_ms, stats.q1_ms, stats.q3_ms, stats.max_ms) == (1.0, 2.0, 4.0, 5.0)
    assert stats.iqr_ms == 2.0
    # Five samples cannot give 95%: the interval is the whole range.
    assert (stats.ci95_low_ms, stats.ci95_high_ms) == (1.0, 5.0)


def test_stats_of_an_even_sample_interpolate():
    stats = summarize([4.0, 1.0, 3.0, 2.0])
    assert stats.median_ms == 2.5
    assert (stats.q1_ms, stats.q3_ms) == (1.75, 3.25)  # numpy's default (linear) method


def test_median_interval_matches_the_binomial_table():
    # Known ranks for 95% order-statistic intervals of the median (Conover's table):
    # n=10 -> (x2, x9), n=20 -> (x6, x15), n=100 -> (x40, x61).
    for n, (low, high) in {10: (2, 9), 20: (6, 15), 100: (40, 61)}.items():
        ordered = [float(i) for i in range(1, n + 1)]
        assert median_confidence_interval(ordered) == (float(low), float(high))


@pytest.mark.parametrize("n", [1, 2, 3, 6, 7, 50, 51, 1000])
def test_stats_always_ordered_and_cover_the_median(n: int):
    samples = [random.Random(n).lognormvariate(0.0, 0.5) for _ in range(n)]
    stats = summarize(samples)  # the schema's own checks run on construction
    assert stats.median_ms == statistics.median(samples)
    assert stats.ci95_low_ms <= stats.median_ms <= stats.ci95_high_ms


# --- work and traffic -------------------------------------------------------------

def brute_force_pairs(S: int, K: int, W: int, causal: bool) -> int:
    total = 0
    for i in range(S):
        if causal:
            window = [j for j in range(S) if i - W < j <= i]
            candidates = [j for j in range(S) if j <= i - W]
        else:
            window = [j for j in range(S) if abs(i - j) < W]
            candidates = [j for j in range(S) if abs(i - j) >= W]
        total += len(window) + min(K, len(candidates))
    return total


def test_attended_pairs_closed_form_equals_counting():
    for S, K, W, causal in itertools.product(range(1, 12), range(0, 14), range(0, 14),
                                             (True, False)):
        assert attended_pairs(S, K, W, causal) == brute_force_pairs(S, K, W, causal), \
            (S, K, W, causal)


def test_attended_pairs_equal_the_reference_selection():
    rng = random.Random(1234)
    for _ in range(25):
        S, K, W, causal = rng.randint(1, 40), rng.randint(0, 45), rng.randint(0, 45), \
            rng.random() < 0.5
        u = torch.randn(1, 1, S, generator=torch.Generator().manual_seed(S))
        mask = sparsek.sparsek_mask(u, kv_budget=K, window=W, causal=causal)
        counted = int((mask.selected | mask.window).sum())
        assert attended_pairs(S, K, W, causal) == counted, (S, K, W, causal)


def test_flops_and_bytes():
    shape = Case(name="c", B=2, Hq=8, Hkv=2, S=100, D=64, dtype="bfloat16", causal=True,
                 kv_budget=200, window=0)
    dense = SdpaImpl(kind="sdpa", backend="flash")
    sparse = SparsekImpl(kind="sparsek", impl="triton")
    assert case_flops(shape, dense) == 4 * 2 * 8 * 64 * (100 * 101 // 2)
    # K >= S selects every allowed pair: SparseK does exactly dense work.
    assert case_flops(shape, sparse) == case_flops(shape, dense)
    qo, kv, u = 2 * 2 * 8 * 100 * 64 * 2, 2 * 2 * 2 * 100 * 64 * 2, 2 * 2 * 100 * 4
    assert (case_bytes(shape, dense), case_bytes(shape, sparse)) == (qo + kv, qo + kv + u)
    assert dense_pairs(7, causal=False) == 49


# --- the gate ---------------------------------------------------------------------

def test_query_positions_sample_keeps_both_ends():
    assert gate.query_positions(48, 48, seed=1) is None
    rows = gate.query_positions(1000, 16, seed=1)
    assert rows.numel() == 16 and rows.unique().numel() == 16
    assert rows[0] == 0 and rows[-1] == 999 and bool((rows[1:] > rows[:-1]).all())
    assert torch.equal(rows, gate.query_positions(1000, 16, seed=1))
    assert not torch.equal(rows, gate.query_positions(1000, 16, seed=2))


@pytest.mark.parametrize("causal", [True, False])
def test_dense_oracle_matches_sdpa_in_float64(causal: bool):
    x = make_inputs(Case(**case("c", S=29, D=16, causal=causal)), "cpu")
    x64 = Inputs(*(t.double() for t in (x.q, x.k, x.v, x.u)))
    rows = torch.tensor([0, 5, 17, 28])
    with sdpa_kernel([SDPBackend.MATH]):
        want = F.scaled_dot_product_attention(x64.q, x64.k, x64.v, is_causal=causal,
                                              enable_gqa=True)
    shape = Case(**case("c", S=29, D=16, causal=causal))
    torch.testing.assert_close(dense_rows(x64, shape, rows), want[:, :, rows])
    torch.testing.assert_close(dense_rows(x64, shape, None), want)


@pytest.mark.parametrize("impl", [SPARSEK_REFERENCE, SDPA_MATH])
def test_gate_does_not_depend_on_oracle_chunking(monkeypatch, impl):
    job = make_job([case("c", B=2, Hq=4, Hkv=4, S=40, dtype="bfloat16")], [impl],
                   correctness={"max_queries": 12})
    shape, which = job.cases[0], job.implementations[0]
    x = make_inputs(shape, "cpu")
    prepared = prepare(which, shape, x, "cpu", LOG)
    whole = gate.check(job.correctness, shape, which, prepared, x, LOG)
    monkeypatch.setattr(gate, "ORACLE_CHUNK_BYTES", 1)  # one kv head per chunk
    chunked = gate.check(job.correctness, shape, which, prepared, x, LOG)
    assert whole.passed and chunked.passed and whole.checked_queries == 12
    assert chunked.rel_error == pytest.approx(whole.rel_error, rel=1e-9)
    assert chunked.reference_rel_error == pytest.approx(whole.reference_rel_error, rel=1e-9)


def test_gate_judges_low_precision_against_the_reference_error():
    ok, _ = gate._judge(3e-3, 2e-3, 1e-2, 2.0)
    too_far, message = gate._judge(5e-3, 2e-3, 1e-2, 2.0)
    assert ok and not too_far and "2 x the PyTorch reference" in message
    assert not gate._judge(float("nan"), None, 1e-5, 2.0)[0]


# --- timing and the case API ------------------------------------------------------

def test_wall_clock_timing_stops_at_max_seconds_with_three_samples():
    policy = TimingPolicy(warmup=0, repetitions=1000, max_seconds=1e-9, flush_l2=True)
    timing = measure(lambda: sum(range(100)), policy, "cpu")
    assert timing.stats.n == 3 and timing.method == "wall-clock" and not timing.l2_flushed
    capped = measure(lambda: None, TimingPolicy(warmup=2, repetitions=4, max_seconds=60), "cpu")
    assert capped.stats.n == 4 and capped.warmup == 2
    assert peak_extra_memory(lambda: None, "cpu") is None


def test_run_case_skips_a_backend_the_device_lacks():
    job = make_job([case("c")], [SDPA_CUDNN])
    result = run_case(job, job.cases[0], job.implementations[0], "cpu", LOG)
    assert result.status == "skipped" and result.timing is None
    assert "'cudnn' is not available on cpu" in result.error


def test_run_case_gates_then_times():
    job = make_job([case("c", dtype="bfloat16")], [SPARSEK_REFERENCE])
    result = run_case(job, job.cases[0], job.implementations[0], "cpu", LOG)
    assert result.status == "ok" and result.gate.passed
    assert result.gate.rel_error <= 2 * result.gate.reference_rel_error + 1e-6
    assert result.flops == case_flops(job.cases[0], job.implementations[0])


def test_inputs_are_random_reproducible_and_never_zero():
    shape = Case(**case("c", dtype="bfloat16"))
    first, again = make_inputs(shape, "cpu"), make_inputs(shape, "cpu")
    assert first.q.dtype == torch.bfloat16 and first.u.dtype == torch.float32
    assert first.u.shape == (1, 2, 48)
    for a, b in zip((first.q, first.k, first.v, first.u), (again.q, again.k, again.v, again.u)):
        assert torch.equal(a, b) and a.float().abs().sum() > 0
    assert not torch.equal(first.k, first.v)


def test_event_sink_writes_one_json_object_per_line(tmp_path):
    job = make_job([case("c")], [SDPA_CUDNN])
    result = run_case(job, job.cases[0], job.implementations[0], "cpu", LOG)
    path = tmp_path / "events.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        emit = json_lines(stream)
        emit(case_done(result, 0, 1))
        emit(done([result]))
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["status"] == "skipped" and lines[0]["median_ms"] is None
    assert lines[1] == {"event": "done", "failed": [], "counts": {"skipped": 1}}
