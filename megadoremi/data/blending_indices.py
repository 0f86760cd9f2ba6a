"""Megatron's blending indices, bit for bit, in pure Python + numpy (nothing compiled at install or run time).

Megatron's ``helpers.cpp::build_blending_indices`` is a greedy over samples ``i = 0 .. N-1``::

    x = max(double(i), 1.0)
    k = argmax_k (w[k] * x - double(count[k]))        # strict '>' scan: ties go to the lowest k
    dataset_index[i] = k; dataset_sample_index[i] = count[k]; count[k] += 1

A Python loop over 10^8 samples is ~100x too slow, and no static formula reproduces the greedy (errors reach
~1.7, so domains miss their "natural" slot). We run the same recurrence *time-parallel*:

1. Split [0, N) into M lanes of B consecutive samples and guess every lane's starting count vector: rounding of
   rate * start for frequent domains; for slow ones (picked less than once a lane) the error level at which
   they are typically picked, estimated from a short pilot run. Lane 0 starts at zeros, which is exact.
2. First pass: simulate all lanes together, one numpy step per sample position over arrays of shape (K, M),
   split over threads (numpy releases the GIL). The errors are computed with the very operations the C++
   performs (one IEEE double multiply, one subtract; no FMA), so every comparison agrees. The argmax with
   lowest-index ties is an exact bit code: indicator(error == max) times 2^(K-1-k), summed by a BLAS gemv (a sum
   of distinct powers of two is exact), highest set bit = lowest tied k. Most steps are decided on cheaper
   float32 running errors with a proven error bound (``_Screen``); near-ties fall back to the exact errors.
3. Slow domains' lane starts are corrected from the picks the lanes themselves recorded, and changed lanes are
   re-run (a slow domain off by one pick makes a lane differ until that pick, often to its end).
4. Settle. A lane's recorded output is the exact greedy *from the start it was simulated from*. Where that start
   differs from the previous lane's end state, the lane is re-simulated from the true start until both runs hold
   the same count vector at the same step; from there they coincide (the greedy is deterministic), so the rest of
   the recorded lane is kept. The greedy forgets a wrong start fast (a frequent domain within ~1/w steps), so
   this re-simulates a few percent of the samples. Rounds repeat until every lane starts where its predecessor
   ends.

Why the result is exact: by induction over lanes, once lane j-1's output is the exact greedy from the true start,
its end state is the true state at lane j's start, and lane j is then brought to the exact greedy from that
state. Guesses only decide how much re-simulation is needed, never the output. Tests compare with megatron-core's
compiled helper on many weight vectors (``tests/test_blending_indices.py``).
"""

import os
import threading

import numpy as np

# Steps buffered per lane before a block of output is written out row by row (rows = lanes).
_BLOCK_STEPS = 32
# Lanes simulated together by one thread in the first pass; more lanes amortise numpy's per-call overhead.
_LANES_PER_THREAD = 8192
# Cap on domains x lanes per thread: the (K, M) working arrays stay a few MB even with many domains.
_MAX_STATE_ENTRIES = 1 << 18
# Shortest lane worth a lane of its own: fewer steps per lane means more lane boundaries to settle.
_MIN_LANE_STEPS = 1024
# Below this many (step, domain) pairs the plain loop is quicker than setting up lanes.
_REFERENCE_MAX_WORK = 20_000
# Re-runs of at most this many lanes use a plain Python loop (faster than numpy for so few states).
_PYTHON_MAX_LANES = 4
# Steps a lane re-run from a start that may still change gets to re-join its recording before it is undone.
_SPECULATIVE_STEPS = 256
# Steps between checks whether a re-simulated lane has re-joined its recorded trajectory.
_COUPLING_CHECK_STEPS = 8
_MAX_THREADS = 4
# Domains picked fewer times than this per lane get their lane-start counts from estimated pick levels.
_SLOW_PICKS_PER_LANE = 1.0
# Pilot run that samples the distribution of the maximum error (see _Lanes._pick_levels).
_PILOT_LANES = 256
_PILOT_WARMUP_STEPS = 32
_PILOT_SAMPLE_STEPS = 64
_PILOT_MAX_STEPS = 384
_OBSERVED_LANES = 256  # lanes scanned for recorded picks of each slow domain
# The float32 screen (see _Screen) needs the tie code to fit float32; it is dropped for the rest of a block
# when its candidate window is wider than this or more than 1/share of the lanes needed exact errors.
_SCREEN_MAX_DOMAINS = 24
_SCREEN_STEPS = 16  # steps between re-synchronisations with the exact errors
_SCREEN_MAX_WINDOW = 1e-3
_SCREEN_MAX_AMBIGUOUS_SHARE = 8
# Rounds of correcting slow domains' lane starts from the lanes' own picks before settling.
_REFINE_ROUNDS = 3


def normalize_weights(weights) -> np.ndarray:
    """Weights as float64 summing to 1; ``ValueError`` naming the entry if empty, non-finite, negative or all zero.

    Zero entries are allowed and stay zero; ``build_blending_indices`` never selects a zero-weight domain.
    """
    w = _checked_weights(weights)
    # The same division Megatron's BlendedDataset does (np.sum then divide), so the blend matches bit for bit.
    return w / np.sum(w)


def _checked_weights(weights) -> np.ndarray:
    """float64 1-D copy of ``weights``; ``ValueError`` naming the first bad entry."""
    w = np.array(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {w.shape}")
    for bad, problem in ((~np.isfinite(w), "is not finite"), (w < 0, "is negative")):
        index = np.flatnonzero(bad)
        if index.size:
            raise ValueError(f"weights[{index[0]}] = {w[index[0]]} {problem}")
    if not (w > 0).any():
        raise ValueError(f"weights are all zero: {w.tolist()}")
    return w


def build_blending_indices(weights, size: int, num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend: ``(dataset_index int16, dataset_sample_index int64)``, identical to its C++ helper.

    ``weights`` are used as given (pass ``normalize_weights(raw)``, as Megatron normalises before calling its
    helper). Domains with weight 0 are never selected; Megatron refuses them outright, and its helper would pick
    one only on an all-errors-equal floating-point tie, which cannot be what a zero weight means. With every
    weight positive the output equals ``helpers_cpp.build_blending_indices`` exactly. ``num_threads`` only
    changes speed (default: up to 4 usable cores).
    """
    w = _checked_weights(weights)
    if w.size > np.iinfo(np.int16).max + 1:
        raise ValueError(f"{w.size} domains do not fit Megatron's int16 dataset index")
    size = int(size)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    positive = np.flatnonzero(w > 0)
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    _greedy(w[positive], dataset_index, dataset_sample_index, num_threads)
    if positive.size < w.size:
        # Map positions among the positive domains back to the caller's domain ids.
        dataset_index[:] = positive.astype(np.int16)[dataset_index]
    return dataset_index, dataset_sample_index


def _build_blending_indices_reference(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The C++ loop transcribed to Python (IEEE doubles, no FMA): slow, for tests and tiny sizes."""
    w = [float(v) for v in np.asarray(weights, dtype=np.float64)]
    dataset_index = np.empty(int(size), dtype=np.int16)
    dataset_sample_index = np.empty(int(size), dtype=np.int64)
    _reference_loop(w, [0] * len(w), 0, int(size), dataset_index, dataset_sample_index)
    return dataset_index, dataset_sample_index


def _reference_loop(w, counts, start, stop, dataset_index, dataset_sample_index) -> None:
    """Run the greedy for samples [start, stop) from ``counts`` (updated in place), writing into the outputs."""
    num_domains = len(w)
    for i in range(start, stop):
        x = max(float(i), 1.0)
        best = 0
        best_error = w[0] * x - float(counts[0])
        for k in range(1, num_domains):
            error = w[k] * x - float(counts[k])
            if error > best_error:
                best_error = error
                best = k
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1


def _greedy(w: np.ndarray, dataset_index: np.ndarray, dataset_sample_index: np.ndarray, num_threads) -> None:
    """Fill both outputs with the greedy for positive weights ``w``."""
    size, num_domains = dataset_index.size, w.size
    if num_domains == 1:
        dataset_index[:] = 0
        dataset_sample_index[:] = np.arange(size, dtype=np.int64)
        return
    if size * num_domains <= _REFERENCE_MAX_WORK:
        _reference_loop(w.tolist(), [0] * num_domains, 0, size, dataset_index, dataset_sample_index)
        return
    if num_threads is None:
        num_threads = min(_MAX_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    num_threads = max(1, int(num_threads))
    lanes_per_thread = max(64, min(_LANES_PER_THREAD, _MAX_STATE_ENTRIES // num_domains))
    num_lanes = max(1, min(num_threads * lanes_per_thread, size // _MIN_LANE_STEPS))
    lane_steps = -(-size // num_lanes)
    num_lanes = -(-size // lane_steps)
    lanes = _Lanes(w, size, lane_steps, num_lanes, dataset_index, dataset_sample_index)
    lanes.first_pass(min(num_threads, max(1, num_lanes // 512)))
    for _ in range(_REFINE_ROUNDS):
        tasks = lanes.refine_slow_counts()
        if tasks is None:
            break
        lanes.rerun(tasks)
    lanes.settle()


def _long_run_rates(w: np.ndarray) -> np.ndarray:
    """Fraction of samples each domain gets in the long run: max(w - level, 0) summing to 1.

    All chosen domains' errors w*i - count must stay within O(1) of each other, so they grow at one common rate
    (the level); domains with w below it are never chosen. For weights summing to 1 this is w itself; weights
    that do not sum to 1 are shifted, not scaled.
    """
    order = np.sort(w)[::-1]
    levels = (np.cumsum(order) - 1.0) / np.arange(1, w.size + 1)  # level if the n largest domains are active
    num_active = int(np.flatnonzero(order > levels)[-1]) + 1
    return np.maximum(w - levels[num_active - 1], 0.0)


class _Chooser:
    """The greedy's step for M independent states at once: argmax_k (w[k] * x - count[k]), lowest k on ties."""

    def __init__(self, w: np.ndarray, num_states: int):
        num_domains = w.size
        self.weights = w.reshape(num_domains, 1)
        self.errors = np.empty((num_domains, num_states))  # (K, M)
        self.best = np.empty(num_states)  # (M,) the maximum error of each state
        self.states = np.arange(num_states, dtype=np.int64)
        # Exact bit code of the tied maxima: float32 holds integers < 2^24 exactly, float64 < 2^53.
        if num_domains <= 24:
            code_dtype, int_dtype, mantissa_bits, bias = np.float32, np.int32, 23, 127
        elif num_domains <= 53:
            code_dtype, int_dtype, mantissa_bits, bias = np.float64, np.int64, 52, 1023
        else:
            code_dtype = None  # too many domains for one code word: numpy's argmax (first maximum) instead
        self.code_dtype = code_dtype
        if code_dtype is not None:
            self.powers = np.ldexp(1.0, np.arange(num_domains - 1, -1, -1)).astype(code_dtype)  # 2^(K-1-k)
            self.indicator = np.empty((num_domains, num_states), dtype=code_dtype)
            self.code = np.empty(num_states, dtype=code_dtype)
            self.code_bits = self.code.view(int_dtype)
            self.exponent = np.empty(num_states, dtype=int_dtype)
            self.mantissa_bits = mantissa_bits
            # Highest set bit j of the code has biased exponent j + bias, and the lowest tied k is K - 1 - j.
            self.offset = num_domains - 1 + bias
            self.flat_offset = self.offset * num_states + self.states

    def choose(self, counts: np.ndarray, x: np.ndarray, domain_out: np.ndarray, flat_out: np.ndarray) -> None:
        """One step for counts (K, M) float64 at positions x (M,) float64.

        Writes the chosen domain of each state into ``domain_out`` and its flat index in ``counts``
        (``k * M + state``) into ``flat_out`` (int64).
        """
        errors = self.errors
        np.multiply(self.weights, x, out=errors)
        np.subtract(errors, counts, out=errors)
        if self.code_dtype is None:
            np.argmax(errors, axis=0, out=flat_out)
            domain_out[...] = flat_out
            np.multiply(flat_out, self.states.size, out=flat_out)
            flat_out += self.states
            return
        np.maximum.reduce(errors, axis=0, out=self.best)
        np.equal(errors, self.best, out=self.indicator, casting="unsafe")
        np.dot(self.powers, self.indicator, out=self.code)
        np.right_shift(self.code_bits, self.mantissa_bits, out=self.exponent)
        np.subtract(self.offset, self.exponent, out=domain_out, casting="unsafe")
        np.multiply(self.exponent, self.states.size, out=flat_out)  # (offset - exponent) * M + state
        np.subtract(self.flat_offset, flat_out, out=flat_out)


class _Screen:
    """Float32 running errors that decide most steps without computing the exact float64 errors.

    ``approx`` (K, M) follows e = fl(w * x) - count: set to fl32(e) at a block's first step, then per step
    ``+ fl32(w)`` and ``- 1`` for the chosen domain. ``resync`` bounds |approx - e| by ``tolerance`` over the
    block (float32 rounding of every operation, plus the double rounding of w * x the exact errors carry); all
    domains within 2 * tolerance of the approximate maximum are candidates, and a lone candidate is the exact
    argmax. Steps with several candidates (near or exact ties) are decided on exact errors for those lanes.
    Four float32 passes a step instead of five float64 ones.
    """

    def __init__(self, w: np.ndarray, num_states: int):
        num_domains = w.size
        self.w = w
        self.w32 = w.astype(np.float32).reshape(num_domains, 1)
        self.approx = np.empty((num_domains, num_states), dtype=np.float32)  # (K, M)
        self.flat_approx = self.approx.reshape(-1)
        self.indicator = np.empty((num_domains, num_states), dtype=np.float32)
        self.powers = np.ldexp(1.0, np.arange(num_domains - 1, -1, -1)).astype(np.float32)  # 2^(K-1-k)
        self.best = np.empty(num_states, dtype=np.float32)
        self.code = np.empty(num_states, dtype=np.float32)
        self.code_bits = self.code.view(np.int32)
        self.exponent = np.empty(num_states, dtype=np.int32)
        self.offset = num_domains - 1 + 127  # float32 exponent bias, as in _Chooser
        self.states = np.arange(num_states, dtype=np.int64)
        self.flat_offset = self.offset * num_states + self.states
        self.window = np.float32(0.0)
        self.w_max = float(w.max())
        self.w_sum = float(np.sum(w))
        self.w_list = w.tolist()

    def resync(self, errors: np.ndarray, flat: np.ndarray, max_position: float, block_steps: int) -> bool:
        """Start a block from the exact errors (K, M) of its first step, whose choice is ``flat``.

        The bound, for e = fl(fl(w * x) - count) as the C++ computes it and x <= ``max_position``:
        - over the block, |e| <= ``bound``: no error rises by more than w (plus the product's rounding) a step,
          a chosen error drops to >= (the maximum) - 1 >= (the mean) - 1, and the mean, (x * sum(w) - i) / K
          plus roundings, is >= -``drift``; non-chosen errors never fall;
        - approx - e: fl32 of e at the start, then per step fl32(w), the add and the decrement (2^-24
          relative each), plus the roundings e itself carries (product: 2^-53 * w * x at either end;
          subtraction: 2^-53 * |e|), which approx does not follow.
        False if screening would not pay (the candidate window would be too wide).
        """
        top, bottom = float(errors.max()), float(errors.min())
        largest = max(abs(top), abs(bottom))
        eps32, eps64 = 2.0**-24, 2.0**-53
        product = 2 * eps64 * self.w_max * max_position  # bound on |fl(w * x) - w * x|, doubled for slack
        drift = abs(self.w_sum - 1.0) * max_position + self.w.size * product + 1e-12
        bound = max(-bottom, 1.0 + drift, top + block_steps * (self.w_max + product)) + 1e-9
        tolerance = (
            eps32 * largest  # fl32 of the exact errors
            + block_steps * eps32 * (2 * bound + 3)  # fl32(w) and the add, the decrement, each step
            + 2 * product + 4 * eps64 * (bound + 1)  # the exact errors' own roundings
            + 2.0**-120  # subnormal slack
        )
        window = 1.01 * (2 * tolerance + 4 * eps32 * bound)  # and the rounding of (max - window) itself
        if window > _SCREEN_MAX_WINDOW:
            return False
        self.window = np.float32(window)
        np.copyto(self.approx, errors, casting="same_kind")
        self.flat_approx[flat] -= 1.0
        np.add(self.approx, self.w32, out=self.approx)
        return True

    def choose(self, counts: np.ndarray, x: np.ndarray, domain_out: np.ndarray, flat_out: np.ndarray) -> bool:
        """Like ``_Chooser.choose``; False when too many lanes needed exact errors (stop screening this block)."""
        approx = self.approx
        np.maximum.reduce(approx, axis=0, out=self.best)
        np.subtract(self.best, self.window, out=self.best)
        np.greater_equal(approx, self.best, out=self.indicator, casting="unsafe")
        np.dot(self.powers, self.indicator, out=self.code)
        np.right_shift(self.code_bits, 23, out=self.exponent)
        np.subtract(self.offset, self.exponent, out=domain_out, casting="unsafe")
        np.multiply(self.exponent, self.states.size, out=flat_out)
        np.subtract(self.flat_offset, flat_out, out=flat_out)
        # A power of two (empty mantissa) means a lone candidate; otherwise decide on exact errors.
        ambiguous = np.flatnonzero(self.code_bits & 0x7FFFFF)
        if ambiguous.size == 0:
            return True
        num_states = self.states.size
        if ambiguous.size <= _PYTHON_MAX_LANES:
            # Usually one or two lanes: plain Python beats a dozen numpy calls on tiny arrays.
            w = self.w_list
            for state in ambiguous.tolist():
                position = float(x[state])
                column = counts[:, state].tolist()
                best, best_error = 0, w[0] * position - column[0]
                for k in range(1, len(w)):
                    error = w[k] * position - column[k]
                    if error > best_error:
                        best, best_error = k, error
                domain_out[state] = best
                flat_out[state] = best * num_states + state
                self.indicator[:, state] = 0.0
                self.indicator[best, state] = 1.0
            return True
        exact = self.w[:, None] * x[ambiguous] - counts[:, ambiguous]  # (K, n) as the C++ computes them
        chosen = np.argmax(exact, axis=0)  # the first maximum: lowest index on ties
        domain_out[ambiguous] = chosen
        flat_out[ambiguous] = chosen * num_states + ambiguous
        # The indicator becomes one-hot on the choice, for ``advance``.
        self.indicator[:, ambiguous] = 0.0
        self.indicator[chosen, ambiguous] = 1.0
        return ambiguous.size * _SCREEN_MAX_AMBIGUOUS_SHARE <= num_states

    def advance(self) -> None:
        """After a step: the chosen domains' errors drop by 1 (the one-hot indicator), every error grows by w."""
        np.subtract(self.approx, self.indicator, out=self.approx)
        np.add(self.approx, self.w32, out=self.approx)


class _Lanes:
    """Lanes of ``lane_steps`` consecutive samples, their recorded start and end states, and how to settle them."""

    def __init__(self, w, size, lane_steps, num_lanes, dataset_index, dataset_sample_index):
        self.w = w
        self.size = size
        self.lane_steps = lane_steps
        self.num_lanes = num_lanes
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index
        self.lane_start = np.arange(num_lanes, dtype=np.int64) * lane_steps
        self.lane_stop = np.minimum(self.lane_start + lane_steps, size)
        # The output of lane j is the exact greedy from counts start_counts[:, j]; it ends at end_counts[:, j].
        self.rates = _long_run_rates(w)
        self.tried = np.zeros(num_lanes, dtype=bool)
        self.levels_observed = False
        self.start_counts = self._guess_counts(self.lane_start)  # (K, M) int64
        self.start_counts[:, 0] = 0  # the true start of lane 0: everything else is settled against it
        self.end_counts = np.zeros_like(self.start_counts)

    def _guess_counts(self, starts: np.ndarray) -> np.ndarray:
        """Count vectors (K, M) int64 summing to each start, as close to the greedy's as cheaply possible.

        Frequent domains: largest-remainder rounding of rate * start (a wrong guess re-joins within ~1/rate
        steps). Slow domains (a few picks per lane or fewer): a domain is picked once its error clears the dips
        of the running maximum error, at a level estimated by ``_pick_levels``; a wrong guess here costs a
        re-run of every lane until the pick, so it is worth the estimate.
        """
        rates = self.rates
        share = rates[:, None] * starts[None, :].astype(np.float64)  # (K, M)
        counts = np.floor(share)
        slow = rates * self.lane_steps < _SLOW_PICKS_PER_LANE
        slow[np.argmax(rates)] = False
        self.slow = slow
        self.levels = np.zeros(rates.size)
        if slow.any():
            # Guess late rather than early: a lane that starts with the pick still pending records it, which
            # ``refine_slow_counts`` then trusts; a lane that starts after a pick the greedy has not made yet
            # tells nothing about when it comes.
            self.levels, late = self._pick_levels(slow)
            counts[slow] = np.maximum(np.ceil(share[slow] - late[slow, None]), 0.0)
            counts[rates == 0] = 0.0  # below the common level: never picked
        missing = starts - counts.sum(axis=0).astype(np.int64)  # (M,), may be < 0 after the slow domains
        remainder = share - counts
        remainder[slow] = -np.inf  # slow domains are settled above: only frequent ones absorb the rest
        rank = np.argsort(np.argsort(-remainder, axis=0, kind="stable"), axis=0, kind="stable")
        counts += rank < missing[None, :]
        num_fast = int((~slow).sum())
        counts -= (rank >= num_fast + missing[None, :]) & (rank < num_fast)  # missing < 0: smallest remainders
        counts = counts.astype(np.int64)
        # A wrong total could never re-join the greedy: whatever rounding leaves over goes to the largest domain.
        counts[np.argmax(rates)] += starts - counts.sum(axis=0)
        return counts

    def _pick_levels(self, slow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Error levels (K,) at which each slow domain is picked half and 99% of the time, from a pilot run.

        A slow domain's error creeps up by ``rate`` a step and it is picked the first time the maximum error of
        the others dips below it. With F the distribution of the maximum error, the chance it is still waiting
        at level e is about exp(-G(e) / rate), G(e) = integral of F up to e; the median level solves
        G(e) = rate * ln 2. F comes from a pilot of lanes spread over the blend, after a short warm-up.
        """
        num_lanes = min(self.num_lanes, _PILOT_LANES)
        starts = (np.arange(num_lanes, dtype=np.int64) * self.size) // num_lanes + 1
        share = self.rates[:, None] * starts[None, :].astype(np.float64)
        counts = np.floor(share)
        rank = np.argsort(np.argsort(-(share - counts), axis=0, kind="stable"), axis=0, kind="stable")
        counts += rank < (starts - counts.sum(axis=0).astype(np.int64))[None, :]
        flat_counts = counts.reshape(-1)
        chooser = _Chooser(self.w, num_lanes)
        chosen, flat = np.empty(num_lanes, dtype=np.int64), np.empty(num_lanes, dtype=np.int64)
        x = starts.astype(np.float64)
        samples = []
        # The frequent domains forget their guessed start within ~1/rate steps: warm up past that, then sample.
        warmup = int(min(_PILOT_MAX_STEPS, _PILOT_WARMUP_STEPS + 2.0 / self.rates[~slow].min()))
        for step in range(warmup + _PILOT_SAMPLE_STEPS):
            chooser.choose(counts, x, chosen, flat)
            if step >= warmup:
                # What a slow domain competes with: the frequent domains' maximum error, relative to the mean
                # error (which drifts by x * (sum(w) - 1) / K when weights do not sum to 1).
                samples.append(chooser.errors[~slow].max(axis=0) - chooser.errors.mean(axis=0))
            flat_counts[flat] += 1.0
            x += 1.0
        best = np.sort(np.concatenate(samples))
        # G at the sample points: G(best[i]) = mean over j < i of (best[i] - best[j]).
        cumulative = np.concatenate([[0.0], np.cumsum(best)[:-1]])
        below = np.arange(best.size)
        g = (best * below - cumulative) / best.size
        median = np.interp(self.rates * np.log(2.0), g, best)
        late = np.interp(self.rates * np.log(100.0), g, best)  # still waiting 1% of the time
        median[~slow], late[~slow] = 0.0, np.inf
        return median, late

    # ---- first pass: every lane from its guess, in lockstep ----

    def first_pass(self, num_threads: int) -> None:
        """Simulate every lane from its guessed start, lanes split over ``num_threads`` threads."""
        bounds = np.linspace(0, self.num_lanes, num_threads + 1).astype(int)
        groups = [(bounds[i], bounds[i + 1]) for i in range(num_threads) if bounds[i + 1] > bounds[i]]
        if len(groups) == 1:
            self._first_pass_group(*groups[0])
            return
        errors = []

        def run(first, last):
            try:
                self._first_pass_group(first, last)
            except BaseException as error:  # re-raised in the calling thread
                errors.append(error)

        threads = [threading.Thread(target=run, args=group, daemon=True) for group in groups]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _first_pass_group(self, first: int, last: int) -> None:
        """Lanes [first, last): simulate lane_steps steps, writing outputs a block of steps at a time.

        Every ``_SCREEN_STEPS``-th step is exact and re-synchronises the float32 screen (``_Screen``), which
        decides the steps in between unless near-ties make it pointless.
        """
        num = last - first
        steps = self.lane_steps
        counts = np.ascontiguousarray(self.start_counts[:, first:last], dtype=np.float64)  # (K, num)
        flat_counts = counts.reshape(-1)
        chooser = _Chooser(self.w, num)
        screen = _Screen(self.w, num) if self.w.size <= _SCREEN_MAX_DOMAINS else None
        flat = np.empty(num, dtype=np.int64)
        block = min(_BLOCK_STEPS, steps)
        chosen_block = np.empty((num, block), dtype=np.int16)  # (lanes, steps): rows go straight to the output
        sample_block = np.empty((num, block))  # float64: cast to int64 once per block, not per step
        positions = np.empty((block, num))  # (steps, lanes) of max(i, 1) as float64
        starts = self.lane_start[first:last].astype(np.float64)
        # Only the problem's last lane can be shorter than lane_steps; its extra steps are simulated, not kept.
        full = num if self.lane_stop[last - 1] - self.lane_start[last - 1] == steps else num - 1
        index_rows = self.dataset_index[first * steps:(first + full) * steps].reshape(full, steps)
        sample_rows = self.dataset_sample_index[first * steps:(first + full) * steps].reshape(full, steps)
        for t0 in range(0, steps, block):
            nb = min(block, steps - t0)
            np.add(starts[None, :], np.arange(t0, t0 + nb, dtype=np.float64)[:, None], out=positions[:nb])
            if t0 == 0:
                np.maximum(positions[0], 1.0, out=positions[0])
            screened = False
            for t in range(nb):
                if t % _SCREEN_STEPS == 0:
                    screened = False
                if screened:
                    screened = screen.choose(counts, positions[t], chosen_block[:, t], flat)
                else:
                    chooser.choose(counts, positions[t], chosen_block[:, t], flat)
                taken = flat_counts[flat]  # (num,) counts of the chosen domains = their sample indices
                sample_block[:, t] = taken
                np.add(taken, 1.0, out=taken)
                flat_counts[flat] = taken
                if screened:
                    screen.advance()
                elif t % _SCREEN_STEPS == 0 and screen is not None and t0 + t > 0:
                    # (Not from sample 0: x = max(i, 1) does not advance from i = 0 to 1.)
                    last_step = min(nb, t + _SCREEN_STEPS) - 1
                    screened = screen.resync(chooser.errors, flat, positions[last_step].max(), last_step - t + 1)
            index_rows[:, t0:t0 + nb] = chosen_block[:full, :nb]
            sample_rows[:, t0:t0 + nb] = sample_block[:full, :nb]
            if full < num:
                lane_start, lane_stop = self.lane_start[last - 1] + t0, self.lane_stop[last - 1]
                keep = max(0, min(nb, lane_stop - lane_start))
                self.dataset_index[lane_start:lane_start + keep] = chosen_block[-1, :keep]
                self.dataset_sample_index[lane_start:lane_start + keep] = sample_block[-1, :keep]
        self.end_counts[:, first:last] = counts.astype(np.int64)
        if full < num:
            # The last lane ran past the end of the blend: its end state is never used, only kept consistent.
            self.end_counts[:, last - 1] = -1

    # ---- settling ----

    def refine_slow_counts(self) -> "_Tasks | None":
        """Correct slow domains' lane-start counts from the first pass's own picks; the changed lanes' re-runs.

        Walking the lanes in order with the believed true count c of a slow domain: a lane that recorded c at
        its start shows the true picks of that domain (its other counts re-join the truth long before a slow
        pick), so c becomes its recorded end count; a lane that recorded fewer (the truth picked earlier) only
        catches up; a lane that recorded more (the truth is still waiting) adds one once the pick level passes.
        """
        domains = np.flatnonzero(self.slow)
        if domains.size == 0 or self.num_lanes < 2:
            return None
        if not self.levels_observed:
            self._observe_levels(domains)
        recorded_start = self.start_counts[domains].tolist()
        recorded_end = self.end_counts[domains].tolist()
        stops = self.lane_stop.tolist()
        believed = [row[:] for row in recorded_start]
        for d, k in enumerate(domains):
            start, end, out = recorded_start[d], recorded_end[d], believed[d]
            rate, level = float(self.rates[k]), float(self.levels[k])
            count = 0
            for lane in range(self.num_lanes - 1):
                if count == start[lane]:
                    count = end[lane]
                elif count > start[lane]:
                    count = max(count, end[lane])
                elif rate * stops[lane] - count >= level:
                    count += 1
                out[lane + 1] = count
        change = np.zeros_like(self.start_counts)
        change[domains] = np.asarray(believed, dtype=np.int64) - self.start_counts[domains]
        largest = int(np.argmax(self.w))
        change[largest] -= change.sum(axis=0)
        lanes = np.flatnonzero(change.any(axis=0))
        if lanes.size == 0:
            return None
        guess = self.start_counts[:, lanes] + change[:, lanes]
        tasks = _Tasks(lanes, self.lane_start[lanes], guess, self.start_counts[:, lanes])
        self.start_counts[:, lanes] = guess
        return tasks

    def _observe_levels(self, domains: np.ndarray) -> None:
        """Replace the pilot's pick levels by the levels the first pass recorded, where it recorded enough picks.

        The pilot's estimate assumes the maximum error dips at random; with few frequent domains it does not
        (one domain next to a dominant one is picked at a fixed level). Picks in a lane's first steps, where a
        wrong guess may make a domain overdue, are left out.
        """
        self.levels_observed = True
        fast = self.rates[~self.slow]
        warmup = int(min(self.lane_steps // 2, _PILOT_WARMUP_STEPS + 2.0 / fast.min()))
        for k in domains:
            picked = np.flatnonzero(self.end_counts[k, :-1] > self.start_counts[k, :-1])
            levels = []
            for lane in picked[:: max(1, picked.size // _OBSERVED_LANES)].tolist():
                first, stop = int(self.lane_start[lane]) + warmup, int(self.lane_stop[lane])
                at = first + np.flatnonzero(self.dataset_index[first:stop] == k)
                levels.extend((self.rates[k] * at - self.dataset_sample_index[at]).tolist())
            if len(levels) >= 3:
                self.levels[k] = float(np.median(levels))

    def rerun(self, tasks: "_Tasks") -> None:
        """Re-run lanes from new start guesses (start_counts already updated) so their recordings match them."""
        self._resimulate(tasks, np.zeros(self.num_lanes, dtype=bool), hand_on=False)

    def settle(self) -> None:
        """Bring every lane to the exact greedy from its predecessor's end state (see the module docstring).

        Each round re-runs the stale lanes. The first of consecutive stale lanes starts from a final state and
        runs to the end if need be; the others start from ends that may still change, so they only get a few
        hundred steps to re-join their recordings (most do within a few steps), once: a lane that does not is
        put back as it was and waits until it is the first. A lane is *active* while a task for it is pending;
        a lane whose end state changes hands the new state to its successor at once.
        """
        active = np.zeros(self.num_lanes, dtype=bool)
        tried = self.tried = np.zeros(self.num_lanes, dtype=bool)  # had a speculative attempt from this start
        tasks = []
        while True:
            if not tasks:
                stale = np.flatnonzero((self.start_counts[:, 1:] != self.end_counts[:, :-1]).any(axis=0)) + 1
                if stale.size == 0:
                    return
                first = np.diff(stale, prepend=-1) > 1
                pick = first | ~tried[stale]
                stale, budget = stale[pick], np.where(first[pick], 0, _SPECULATIVE_STEPS)
                tried[stale] = True
                true_start = self.end_counts[:, stale - 1]
                tasks = [_Tasks(stale, self.lane_start[stale], true_start, self.start_counts[:, stale], budget)]
                self.start_counts[:, stale] = true_start
                active[stale] = True
            tasks = self._resimulate(_Tasks.concat(tasks, self.w.size), active)

    def _resimulate(self, tasks: "_Tasks", active: np.ndarray, hand_on: bool = True) -> list:
        """Re-run tasks exactly, in lockstep, until each re-joins its recorded trajectory or reaches its lane's end.

        A task's lane must already record ``tasks.spec`` as its counts at ``tasks.pos``. A task with a budget
        that has not re-joined after that many steps is undone: its lane's recording and start are restored.
        Returns the tasks handed on to successors of lanes whose end state changed (with ``hand_on``).
        """
        w = self.w
        di, si = self.dataset_index, self.dataset_sample_index
        lanes, pos = tasks.lane, tasks.pos.copy()
        true, spec = tasks.true.astype(np.float64), tasks.spec.copy()  # (K, n), C-contiguous
        stop = self.lane_stop[lanes]
        # Tasks with a budget: stop there, keeping what is needed to undo them.
        limit = np.where((tasks.budget > 0) & (pos + tasks.budget < stop), pos + tasks.budget, stop)
        undo = {int(lanes[i]): (int(pos[i]), di[pos[i]:limit[i]].copy(), si[pos[i]:limit[i]].copy(), tasks.spec[:, i])
                for i in np.flatnonzero(limit < stop)}
        bounded = tasks.budget > 0
        handed = []
        while lanes.size:
            num = lanes.size
            if num <= _PYTHON_MAX_LANES:
                # A few lanes: numpy's per-call overhead (~15 calls a step) costs more than a plain loop.
                for i in range(num):
                    pos[i], true[:, i], spec[:, i] = self._resimulate_one(int(pos[i]), int(limit[i]), true[:, i],
                                                                          spec[:, i])
            else:
                chooser = _Chooser(w, num)
                lane_ids = np.arange(num, dtype=np.int64)
                chosen, flat = np.empty(num, dtype=np.int64), np.empty(num, dtype=np.int64)
                flat_true, flat_spec = true.reshape(-1), spec.reshape(-1)
                for _ in range(int(min(_COUPLING_CHECK_STEPS, (limit - pos).min()))):
                    chooser.choose(true, np.maximum(pos, 1).astype(np.float64), chosen, flat)
                    recorded = di[pos].astype(np.int64)  # read before it is overwritten
                    flat_spec[recorded * num + lane_ids] += 1
                    taken = flat_true[flat]
                    di[pos] = chosen
                    si[pos] = taken
                    flat_true[flat] = taken + 1.0
                    pos += 1
            joined = (true == spec).all(axis=0)  # the same counts at the same step: identical from here on
            ended = pos >= stop
            given_up = (pos >= limit) & ~joined & ~ended
            for i in np.flatnonzero(joined | ended | given_up):
                active[lanes[i]] = False
            for i in np.flatnonzero(ended & ~joined):
                self.end_counts[:, lanes[i]] = true[:, i].astype(np.int64)
                if lanes[i] + 1 < self.num_lanes:
                    self.tried[lanes[i] + 1] = False  # a new start to try
                if hand_on:
                    self._hand_on(int(lanes[i]), active, handed, int(bounded[i]) * _SPECULATIVE_STEPS)
            for i in np.flatnonzero(given_up):
                start, old_index, old_sample, old_start = undo[int(lanes[i])]
                di[start:start + old_index.size] = old_index
                si[start:start + old_sample.size] = old_sample
                self.start_counts[:, lanes[i]] = old_start
            keep = ~(joined | ended | given_up)
            # Boolean indexing along axis 1 may return a non-C-contiguous array; the flat views above need C order.
            lanes, pos, stop, limit, bounded = lanes[keep], pos[keep], stop[keep], limit[keep], bounded[keep]
            true, spec = np.ascontiguousarray(true[:, keep]), np.ascontiguousarray(spec[:, keep])
        return handed

    def _hand_on(self, lane: int, active: np.ndarray, handed: list, budget: int) -> None:
        """Queue a re-run of the successor of ``lane`` if its start no longer matches ``lane``'s end.

        ``budget`` is 0 when ``lane``'s own start was final (so is its successor's now), else speculative.
        """
        nxt = lane + 1
        if nxt >= self.num_lanes or active[nxt]:
            return
        true = self.end_counts[:, lane]
        if (true == self.start_counts[:, nxt]).all():
            return
        if budget == 0:
            self._extrapolate(nxt, true - self.start_counts[:, nxt], active, handed)
        handed.append(_Tasks([nxt], [self.lane_start[nxt]], true.reshape(-1, 1),
                             self.start_counts[:, nxt].reshape(-1, 1), budget))
        self.start_counts[:, nxt] = true
        active[nxt] = True

    def _extrapolate(self, lane: int, delta: np.ndarray, active: np.ndarray, handed: list) -> None:
        """Apply ``delta`` to the lanes after ``lane`` that recorded the same count in a domain, and re-run them.

        A slow domain keeps its count over many lanes, so when lane ``lane`` turns out to start with another
        count for it than it recorded, the following lanes that recorded the same count are likely off the same
        way; left alone, they would be found out one lane at a time. (When the true count is behind, some of
        them are past the true pick: they start with it overdue, pick it at once and re-join within a few steps
        after the next settling round.) New starts are guesses like any other (settling checks them); the
        largest domain absorbs the change so that counts still sum to the lane start.
        """
        first = lane + 1
        if first >= self.num_lanes:
            return
        largest = int(np.argmax(self.w))
        change = np.zeros((self.w.size, self.num_lanes - first), dtype=np.int64)
        for k in np.flatnonzero(delta):
            if k == largest:
                continue
            same = (self.start_counts[k, first:] == self.start_counts[k, lane]) & ~active[first:]
            run = int(np.argmin(same)) if not same.all() else same.size
            change[k, :run] += delta[k]
            change[largest, :run] -= delta[k]
        lanes = first + np.flatnonzero(change.any(axis=0))
        if lanes.size == 0:
            return
        guess = self.start_counts[:, lanes] + change[:, lanes - first]
        handed.append(_Tasks(lanes, self.lane_start[lanes], guess, self.start_counts[:, lanes]))
        self.start_counts[:, lanes] = guess
        active[lanes] = True
        self.tried[lanes] = False

    def _resimulate_one(self, pos: int, end: int, true: np.ndarray, spec: np.ndarray):
        """One lane's exact re-run from ``pos`` until it re-joins its recording or reaches ``end``, in plain Python.

        Returns the position reached and the true and recorded counts there.
        """
        w = self.w.tolist()
        num_domains = len(w)
        true, spec = [int(c) for c in true], [int(c) for c in spec]
        differing = sum(a != b for a, b in zip(true, spec))
        recorded = self.dataset_index[pos:end].tolist()
        chosen, taken = [], []
        for offset, old in enumerate(recorded):
            x = max(float(pos + offset), 1.0)
            best = 0
            best_error = w[0] * x - float(true[0])
            for k in range(1, num_domains):
                error = w[k] * x - float(true[k])
                if error > best_error:
                    best_error = error
                    best = k
            chosen.append(best)
            taken.append(true[best])
            if best != old:
                differing += (true[best] == spec[best]) - (true[best] + 1 == spec[best])
                differing += (spec[old] == true[old]) - (spec[old] + 1 == true[old])
            true[best] += 1
            spec[old] += 1
            if differing == 0:
                break
        stop = pos + len(chosen)
        self.dataset_index[pos:stop] = chosen
        self.dataset_sample_index[pos:stop] = taken
        return stop, true, spec


class _Tasks:
    """Lanes to re-run from ``pos``: true counts (K, n), the counts the recording had at ``pos`` (K, n), and
    steps to give up after (0: none)."""

    def __init__(self, lane, pos, true, spec, budget=0):
        self.lane = np.asarray(lane, dtype=np.int64)
        self.pos = np.asarray(pos, dtype=np.int64)
        self.true = np.ascontiguousarray(true, dtype=np.int64)  # (K, n)
        self.spec = np.ascontiguousarray(spec, dtype=np.int64)  # (K, n)
        self.budget = np.broadcast_to(np.asarray(budget, dtype=np.int64), self.lane.shape).copy()  # 0: none

    @property
    def size(self) -> int:
        return self.lane.size

    @staticmethod
    def concat(parts, num_domains) -> "_Tasks":
        if not parts:
            none = np.zeros((num_domains, 0), dtype=np.int64)
            return _Tasks([], [], none, none)
        return _Tasks(
            np.concatenate([p.lane for p in parts]),
            np.concatenate([p.pos for p in parts]),
            np.concatenate([p.true for p in parts], axis=1),
            np.concatenate([p.spec for p in parts], axis=1),
            np.concatenate([p.budget for p in parts]),
        )
