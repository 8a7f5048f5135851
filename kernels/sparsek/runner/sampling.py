"""How to sample a timed call, decided by pure functions of numbers already known.

Kept apart from the code that talks to the GPU, so that every decision (replay a
CUDA graph or not, how many copies of the inputs to rotate over, how many samples
to take next, when to stop) is tested on any machine, and the device code that
follows the decisions stays short.
"""

from __future__ import annotations

import math

from sparsek.runner.stats import CI_MIN_SAMPLES
from sparsek_remote.jobspec import TimingPolicy

# A sample count below this is never a measurement, whatever the time budget says.
MIN_SAMPLES = 3
# Each round of samples adds this fraction of those already taken, so the confidence
# interval is recomputed O(log n) times rather than after every sample.
ROUND_GROWTH = 0.25
# A call counted as at least this long when sizing a graph, so a bogus near-zero
# estimate cannot ask for an enormous graph.
MIN_CALL_US = 0.5
MAX_GRAPH_CALLS = 1000
# Rotation: between two uses of one input set, the other sets must have touched at
# least this many times the L2's size, so that the set has been evicted.
ROTATION_L2_MULTIPLE = 2
MAX_ROTATION_SETS = 64
# Never spend more than this on copies of the inputs, whatever the policy asks.
MAX_ROTATION_BYTES = 4 * 2**30

# Head start: before each event-timed sample the GPU spins this many times the host's
# time to queue one call (plus the extra), so the whole call is queued before the first
# event fires and the sample holds GPU time only, not gaps while the GPU waits for
# launches. Capped, for calls that wait for the GPU themselves.
HEAD_START_MULTIPLE = 2.0
HEAD_START_EXTRA_US = 20.0
MAX_HEAD_START_US = 50_000.0

StopReason = str  # "ci" | "budget" | "repetitions"


def should_use_graph(median_us: float, policy: TimingPolicy) -> bool:
    """Replay a CUDA graph when one call is so short that launch overhead and the
    events' own resolution (about 0.5 us) would be a large part of each sample."""
    return policy.graph_below_us > 0 and 0 < median_us < policy.graph_below_us


def head_start_us(host_enqueue_us: float) -> float:
    """How long the GPU is held before each event-timed sample, given the host's median
    time to queue one call (flush, events and every launch of the call)."""
    wanted = HEAD_START_MULTIPLE * max(host_enqueue_us, 0.0) + HEAD_START_EXTRA_US
    return min(MAX_HEAD_START_US, wanted)


def calls_per_replay(median_us: float, policy: TimingPolicy) -> int:
    """Calls captured in one graph, so that one replay lasts about graph_replay_us."""
    wanted = math.ceil(policy.graph_replay_us / max(median_us, MIN_CALL_US))
    return max(2, min(MAX_GRAPH_CALLS, wanted))


def rotation_count(bytes_per_set: int, l2_bytes: int | None, policy: TimingPolicy) -> int:
    """How many input sets (the original and copies) calls cycle over.

    "auto" rotates only when one set fits in the L2, since only then can a call find
    its inputs still cached by the call before; "always" rotates whenever memory
    allows; "never" and an unknown L2 size (the CPU) give 1.
    """
    if policy.rotate_inputs == "never" or bytes_per_set <= 0 or not l2_bytes:
        return 1
    if policy.rotate_inputs == "auto" and bytes_per_set >= l2_bytes:
        return 1
    needed = math.ceil(ROTATION_L2_MULTIPLE * l2_bytes / bytes_per_set) + 1
    affordable = MAX_ROTATION_BYTES // bytes_per_set
    return max(1, min(needed, MAX_ROTATION_SETS, affordable))


def min_samples(policy: TimingPolicy) -> int:
    """Samples taken before the confidence interval may end sampling."""
    return max(MIN_SAMPLES, min(policy.min_repetitions, policy.repetitions))


def stop_reason(n: int, ci_rel: float, elapsed_s: float,
                policy: TimingPolicy) -> StopReason | None:
    """Why to stop after ``n`` samples, or None to go on.

    ``ci_rel`` is the median's relative 95% CI reach (stats.relative_ci), ``elapsed_s``
    the seconds spent sampling so far. A precise enough median ends sampling first,
    once min_seconds have passed; then the sample cap; then the time budget, once
    there are MIN_SAMPLES samples.
    """
    if (n >= max(CI_MIN_SAMPLES, min_samples(policy)) and ci_rel <= policy.target_ci_rel
            and elapsed_s >= (policy.min_seconds or 0.0)):
        return "ci"
    if n >= policy.repetitions:
        return "repetitions"
    if n >= MIN_SAMPLES and elapsed_s >= policy.max_seconds:
        return "budget"
    return None


def warmup_chunk(done: int, chunk: int, seconds_left: bool, policy: TimingPolicy) -> int:
    """How many warm-up calls to make before the next look at the clock (0: warm-up
    is over), ``seconds_left`` saying whether warmup_seconds have not yet passed.
    Chunks double, so a short call is not held up by a wait after each, and warm-up
    overruns its time by at most about the last chunk."""
    calls_left = max(0, policy.warmup - done)
    if seconds_left:
        return max(1, chunk)
    return calls_left


def round_size(n: int, per_sample_s: float, elapsed_s: float, policy: TimingPolicy) -> int:
    """How many samples to take before looking at the interval again (at least 1).

    While the cost of a sample is unknown (``per_sample_s`` 0), only up to
    MIN_SAMPLES, to learn it. Then enough to reach min_samples, else ROUND_GROWTH of
    those taken; never past the cap, and never more than fit in the time left,
    though a run short of MIN_SAMPLES always gets those.
    """
    left = policy.repetitions - n
    if per_sample_s <= 0:
        return max(1, min(MIN_SAMPLES - n, left))
    wanted = max(min_samples(policy) - n, math.ceil(n * ROUND_GROWTH), 1)
    fits = math.floor((policy.max_seconds - elapsed_s) / per_sample_s)
    return max(1, min(wanted, left, max(fits, MIN_SAMPLES - n)))
