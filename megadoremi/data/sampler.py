"""Mixture sampler for domain weights that change during training (one cursor per domain).

Megatron's blend is a static index built once from fixed weights; DoReMi changes the mixture between rounds
(iterated DoReMi) and a trainer may change it at any step, and rebuilding a blend mid-run repeats or skips
data. This sampler instead draws each sample's domain from the *current* weights and takes the domain's next
sample from a per-domain cursor, so the only state is a handful of numbers that go into every checkpoint.

The stream it produces is a global one: every data-parallel rank holds an identical sampler (same seed, same
weight history), calls ``next_indices(G)`` once per optimizer step with the global batch size G, and keeps its
own slice (see ``rank_slice``). The stream depends only on the seed and on which weights were current at each
position, not on how the draws were chunked into calls: ``next_indices(a)`` then ``next_indices(b)`` gives
exactly ``next_indices(a + b)``. So 2 ranks x micro-batch b, 1 rank x 2b and 1 rank x 2 accumulation steps of b
all see the same global batches.

Within a domain, cursor c (the number of samples already drawn from it) maps to sample ``c % size`` in the
first epoch, i.e. the GPT dataset's own (already shuffled) order. Later epochs of a domain are re-ordered by a
seeded bijection of ``range(size)`` computed on the fly (a Feistel network with cycle walking), so repeated
epochs are not in identical order while memory stays O(1) per domain; every epoch is still a permutation of
``range(size)``: nothing is skipped or repeated within an epoch.

The stream must stay the same across code versions, or a resumed run would silently change its data order:
the domain draws use only ``Generator.random`` on PCG64 (a stream numpy keeps stable), the epoch permutation is
our own integer arithmetic, and tests/test_sampler.py pins a few values so an accidental change shows.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

MODES = ("random", "stratified")
STATE_VERSION = 1
_STATE_FIELDS = (
    "version", "domain_names", "domain_sizes", "mode", "seed", "reshuffle_epochs",
    "weights", "cursors", "credit", "rng",
)

# Distinguishes the epoch-permutation keys from the domain-choice generator, which also seeds from `seed`.
_PERMUTATION_TAG = 0x5EEDD04E
_FEISTEL_ROUNDS = 4
_MIX_MUL_1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finalizer constants
_MIX_MUL_2 = np.uint64(0x94D049BB133111EB)
_EPOCH_STRIDE = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio increment: spreads consecutive epoch numbers


def rank_slice(global_batch_size: int, rank: int, num_ranks: int) -> slice:
    """Rank ``rank``'s share of a global batch: ``[rank * G / R, (rank + 1) * G / R)`` (G divisible by R).

    The convention the sampler expects: per optimizer step, every rank draws the same G samples and keeps this
    contiguous slice; a rank with gradient accumulation then splits its slice into consecutive micro-batches.
    """
    if num_ranks < 1 or not 0 <= rank < num_ranks:
        raise ValueError(f"rank must be in [0, num_ranks): got rank={rank}, num_ranks={num_ranks}")
    if global_batch_size % num_ranks:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the number of ranks {num_ranks}"
        )
    per_rank = global_batch_size // num_ranks
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _mix64(values: np.ndarray, key) -> np.ndarray:
    """splitmix64-style avalanche of ``values + key`` (uint64 arrays; wrapping arithmetic is intended)."""
    z = values + key
    z = (z ^ (z >> np.uint64(30))) * _MIX_MUL_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_MUL_2
    return z ^ (z >> np.uint64(31))


def _feistel(values: np.ndarray, half_bits: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """A keyed bijection of ``range(4 ** half_bits)`` per element (balanced Feistel network).

    ``values`` (n,) uint64; ``half_bits`` (n,) uint64; ``keys`` (n, rounds) uint64: each element has its own
    range and key schedule, so all domains and epochs of a call go through in one vectorized pass.
    """
    mask = (np.uint64(1) << half_bits) - np.uint64(1)
    left, right = values >> half_bits, values & mask
    for round_keys in keys.T:
        left, right = right, left ^ (_mix64(right, round_keys) & mask)
    return (left << half_bits) | right


def permute_positions(positions, sizes, keys) -> np.ndarray:
    """Apply a keyed permutation of ``range(size)`` to each position (in range), in O(len) memory, int64.

    ``sizes`` is one size or one per position; ``keys`` one key schedule, shape (rounds,), or one per position,
    shape (len(positions), rounds). Cycle walking: the Feistel network permutes the smallest power-of-four
    range >= size; values that land outside ``range(size)`` are mapped again until they land inside, which keeps
    the map a bijection of ``range(size)`` (at most 4x the work on average, usually under 2x).
    """
    positions = np.asarray(positions, dtype=np.int64)
    n = positions.shape[0]
    sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), (n,))
    keys = np.broadcast_to(np.asarray(keys, dtype=np.uint64), (n, _FEISTEL_ROUNDS))
    distinct, which = np.unique(sizes, return_inverse=True)
    # Smallest h >= 1 with 4 ** h >= size, from exact integer bit lengths (a float log2 rounds near 2 ** 53).
    half_bits = np.array([max(1, (int(size - 1).bit_length() + 1) // 2) for size in distinct], dtype=np.uint64)
    half_bits = half_bits[which.reshape(-1)]
    limits = sizes.astype(np.uint64)
    out = _feistel(positions.astype(np.uint64), half_bits, keys)
    outside = np.flatnonzero(out >= limits)
    while outside.size:
        out[outside] = _feistel(out[outside], half_bits[outside], keys[outside])
        outside = outside[out[outside] >= limits[outside]]
    return out.astype(np.int64)


class MixtureSampler:
    """Draws (domain id, sample index) pairs from a mixture whose weights may change between draws."""

    def __init__(
        self,
        domain_names: Sequence[str],
        domain_sizes: Sequence[int],
        weights,
        seed: int,
        *,
        mode: str = "random",
        reshuffle_epochs: bool = True,
    ):
        names = list(domain_names)
        if not names:
            raise ValueError("domain_names is empty: a mixture needs at least one domain")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"domain names must be non-empty strings, got {name!r}")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate domain names: {duplicates}")
        sizes = list(domain_sizes)
        if len(sizes) != len(names):
            raise ValueError(f"got {len(sizes)} domain sizes for {len(names)} domains {names}")
        for name, size in zip(names, sizes):
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
                raise ValueError(f"size of domain {name!r} must be an integer >= 0, got {size!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")

        self._names = tuple(names)
        self._sizes = np.array(sizes, dtype=np.int64)  # (K,)
        self._mode = mode
        self._seed = int(seed)
        self._reshuffle_epochs = bool(reshuffle_epochs)
        self._rng = np.random.Generator(np.random.PCG64(self._seed))
        self._cursors = np.zeros(len(names), dtype=np.int64)  # (K,) samples drawn so far per domain
        self._credit = np.zeros(len(names), dtype=np.float64)  # (K,) stratified mode: samples owed per domain
        # (K, rounds) uint64: each domain's base key schedule for reshuffling its epochs, derived from the seed.
        self._domain_keys = np.stack(
            [
                np.random.SeedSequence([self._seed, _PERMUTATION_TAG, domain]).generate_state(
                    _FEISTEL_ROUNDS, dtype=np.uint64
                )
                for domain in range(len(names))
            ]
        )
        self._weights = np.zeros(len(names), dtype=np.float64)
        self._probabilities = np.zeros(len(names), dtype=np.float64)
        self.set_weights(weights)

    # ------------------------------------------------------------------ properties
    @property
    def domain_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def domain_sizes(self) -> np.ndarray:
        return self._sizes.copy()

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def weights(self) -> np.ndarray:
        """The current weights as given (not normalized), float64, shape (K,)."""
        return self._weights.copy()

    @property
    def probabilities(self) -> np.ndarray:
        """The current weights normalized to sum to 1, float64, shape (K,)."""
        return self._probabilities.copy()

    @property
    def num_drawn(self) -> np.ndarray:
        """Samples drawn so far per domain, int64, shape (K,); this is also each domain's cursor."""
        return self._cursors.copy()

    @property
    def num_samples_drawn(self) -> int:
        """Position in the global stream: samples drawn so far over all domains."""
        return int(self._cursors.sum())

    @property
    def epochs(self) -> np.ndarray:
        """Per domain, the epoch the next sample comes from (0 = first pass), int64, shape (K,)."""
        return np.where(self._sizes > 0, self._cursors // np.maximum(self._sizes, 1), 0)

    def num_drawn_by_domain(self) -> dict[str, int]:
        """``{domain name: samples drawn}`` for logging."""
        return {name: int(count) for name, count in zip(self._names, self._cursors)}

    # ------------------------------------------------------------------ weights
    def _validate_weights(self, weights) -> np.ndarray:
        """Weights as a float64 (K,) array; ValueError naming the domain and value when not usable."""
        if isinstance(weights, Mapping):
            missing = [name for name in self._names if name not in weights]
            unknown = [name for name in weights if name not in self._names]
            if missing or unknown:
                raise ValueError(f"weights do not match the domains: missing {missing}, unknown {unknown}")
            weights = [weights[name] for name in self._names]
        try:
            values = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"weights must be a sequence of numbers, got {weights!r}") from exc
        if values.ndim != 1 or values.shape[0] != len(self._names):
            raise ValueError(
                f"got {values.size} weights of shape {values.shape} for {len(self._names)} domains {list(self._names)}"
            )
        for name, value, size in zip(self._names, values.tolist(), self._sizes.tolist()):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"weight of domain {name!r} is {value!r}: weights must be finite and >= 0")
            if value > 0 and size == 0:
                raise ValueError(f"domain {name!r} has weight {value!r} but no samples (size 0)")
        if not (values > 0).any():
            raise ValueError(f"all weights are zero for domains {list(self._names)}: at least one must be > 0")
        return values

    def set_weights(self, weights) -> None:
        """Use ``weights`` (sequence aligned with the domains, or a name -> weight mapping) from the next draw on.

        Setting the weights already in force changes nothing, so a trainer may call this every step.
        """
        values = self._validate_weights(weights)
        probabilities = values / values.sum()
        if self._mode == "stratified" and not np.array_equal(probabilities > 0, self._probabilities > 0):
            self._credit = self._rebase_credit(self._credit, probabilities > 0)
        self._weights = values
        self._probabilities = probabilities

    @staticmethod
    def _rebase_credit(credit: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Credit when the set of domains with a positive weight changes: inactive ones forget theirs, active ones
        are centred.

        A zero-weight domain must never win the argmax, so it keeps no credit, and when re-enabled it starts
        neutral (at the mean of the active domains) rather than with a stale debt. Otherwise credit carries over
        weight changes, which is what keeps each domain's count close to the sum of its past probabilities.
        """
        credit = credit.copy()
        credit[~active] = 0.0
        credit[active] -= credit[active].mean()
        return credit

    # ------------------------------------------------------------------ drawing
    def _draw_domains(self, n: int) -> np.ndarray:
        """The domains of the next n samples, int64 (n,)."""
        if self._mode == "random":
            # Inverse-CDF on one uniform double per sample (one 64-bit PCG64 output each), so the stream does
            # not depend on how draws are chunked into calls. Zero-weight domains own an empty CDF interval.
            cdf = np.cumsum(self._probabilities)
            cdf /= cdf[-1]
            uniforms = self._rng.random(n)  # (n,) in [0, 1)
            return np.searchsorted(cdf, uniforms, side="right").astype(np.int64)
        # Stratified: each domain earns its probability in credit per sample; the richest domain (lowest id on
        # ties) is drawn and pays 1. From zero credit with fixed weights every prefix of n draws holds each domain
        # within 1 of n * p (Megatron's blend rule, with (i + 1) where Megatron writes max(i, 1)); credit carried
        # over a weight change adds less than 1 more. Python loop: ~3 us per sample, ~2 ms for 512.
        active = self._probabilities > 0
        work = np.where(active, self._credit, -np.inf)  # (K,)
        probabilities = self._probabilities
        domains = np.empty(n, dtype=np.int64)
        for i in range(n):
            work += probabilities
            chosen = int(np.argmax(work))
            work[chosen] -= 1.0
            domains[i] = chosen
        self._credit[active] = work[active]
        return domains

    def _sample_indices(self, domains: np.ndarray, cursors: np.ndarray) -> np.ndarray:
        """Sample indices for (domain, absolute cursor) pairs, each domain's epoch order applied; int64 (n,)."""
        sizes = self._sizes[domains]  # (n,)
        positions = cursors % sizes
        if not self._reshuffle_epochs:
            return positions
        # Epoch 0 keeps the dataset's own order. Every later epoch of every domain has its own key schedule:
        # the domain's base keys mixed with the epoch number, (m, rounds).
        later = np.flatnonzero(cursors >= sizes)
        if later.size:
            epochs = (cursors[later] // sizes[later]).astype(np.uint64)
            keys = _mix64(epochs[:, None] * _EPOCH_STRIDE, self._domain_keys[domains[later]])
            positions[later] = permute_positions(positions[later], sizes[later], keys)
        return positions

    def next_indices(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n samples of the global stream: ``(domain_ids, sample_indices)``, both int64 of shape (n,)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        n = int(n)
        domains = self._draw_domains(n)  # (n,)
        counts = np.bincount(domains, minlength=len(self._names))  # (K,)
        # Each sample's cursor: its domain's cursor plus the number of earlier samples of that domain in this call.
        order = np.argsort(domains, kind="stable")
        rank_in_domain = np.empty(n, dtype=np.int64)
        rank_in_domain[order] = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        samples = self._sample_indices(domains, self._cursors[domains] + rank_in_domain)
        for domain in np.flatnonzero(counts):
            start = int(self._cursors[domain])
            self._log_wraps(int(domain), start, start + int(counts[domain]))
        self._cursors += counts
        return domains, samples

    def _log_wraps(self, domain: int, start: int, stop: int) -> None:
        """Log each new epoch of ``domain`` begun by cursors ``[start, stop)``, one line per call."""
        size = int(self._sizes[domain])
        first = max(1, -(-start // size))  # first epoch boundary at or after `start`, never epoch 0
        last = (stop - 1) // size
        if first > last:
            return
        epochs = f"epoch {first}" if first == last else f"epochs {first}..{last}"
        logger.info(
            "domain %r (%d samples) starts %s after %d samples drawn from it%s",
            self._names[domain], size, epochs, first * size,
            ", reshuffled" if self._reshuffle_epochs else ", same order",
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything needed to continue the exact stream, as JSON-serializable plain Python types."""
        rng_state = self._rng.bit_generator.state
        return {
            "version": STATE_VERSION,
            "domain_names": list(self._names),
            "domain_sizes": [int(size) for size in self._sizes],
            "mode": self._mode,
            "seed": self._seed,
            "reshuffle_epochs": self._reshuffle_epochs,
            "weights": [float(value) for value in self._weights],
            "cursors": [int(cursor) for cursor in self._cursors],
            "credit": [float(value) for value in self._credit],
            # 128-bit integers as decimal strings: JSON readers outside Python would round them to doubles.
            "rng": {
                "bit_generator": rng_state["bit_generator"],
                "state": str(rng_state["state"]["state"]),
                "inc": str(rng_state["state"]["inc"]),
                "has_uint32": int(rng_state["has_uint32"]),
                "uinteger": int(rng_state["uinteger"]),
            },
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state`` (see ``state_dict``); ValueError naming the field when it does not fit."""
        missing = [field for field in _STATE_FIELDS if field not in state]
        if missing:
            raise ValueError(f"sampler state lacks the fields {missing}")
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"sampler state version {version!r} is not supported (expected {STATE_VERSION})")
        names = list(state.get("domain_names", []))
        if names != list(self._names):
            raise ValueError(
                f"sampler state domain_names {names} do not match the configured domains {list(self._names)}"
            )
        sizes = list(state.get("domain_sizes", []))
        mismatched = [
            f"{name!r}: state {saved} vs dataset {int(current)}"
            for name, saved, current in zip(self._names, sizes, self._sizes)
            if saved != current
        ]
        if len(sizes) != len(self._names) or mismatched:
            raise ValueError(f"sampler state domain_sizes do not match the datasets ({'; '.join(mismatched)})")
        for field, current in (
            ("mode", self._mode),
            ("seed", self._seed),
            ("reshuffle_epochs", self._reshuffle_epochs),
        ):
            if state.get(field) != current:
                raise ValueError(f"sampler state {field}={state.get(field)!r} does not match configured {current!r}")

        weights = self._validate_weights(state["weights"])
        cursors = list(state["cursors"])
        if len(cursors) != len(self._names) or not all(
            isinstance(cursor, (int, np.integer)) and not isinstance(cursor, bool) and cursor >= 0
            for cursor in cursors
        ):
            raise ValueError(f"sampler state cursors {cursors!r} are not {len(self._names)} integers >= 0")
        try:
            credit = np.array(state["credit"], dtype=np.float64)
        except (TypeError, ValueError):
            credit = None
        if credit is None or credit.shape != self._sizes.shape or not np.isfinite(credit).all():
            raise ValueError(f"sampler state credit {state['credit']!r} is not {len(self._names)} finite numbers")
        rng_state = state["rng"]
        if not isinstance(rng_state, Mapping) or rng_state.get("bit_generator") != "PCG64":
            raise ValueError(f"sampler state rng {rng_state!r} is not a PCG64 state")
        rng = np.random.Generator(np.random.PCG64(self._seed))
        try:
            rng.bit_generator.state = {
                "bit_generator": "PCG64",
                "state": {"state": int(rng_state["state"]), "inc": int(rng_state["inc"])},
                "has_uint32": int(rng_state["has_uint32"]),
                "uinteger": int(rng_state["uinteger"]),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"sampler state rng {rng_state!r} is not a valid PCG64 state: {exc}") from exc

        # Everything validated: only now replace the live state.
        self._weights = weights
        self._probabilities = weights / weights.sum()
        self._cursors = np.array(cursors, dtype=np.int64)
        self._credit = credit
        self._rng = rng
