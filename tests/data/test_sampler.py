"""MixtureSampler: determinism, exact resume, mixture fidelity, per-domain epochs, rank slicing."""

import json
import logging

import numpy as np
import pytest

from megadoremi.data.sampler import MixtureSampler, permute_positions, rank_slice

NAMES = ["web", "code", "books", "math"]
SIZES = [50, 23, 7, 1000]  # small domains so the runs below wrap several times
MODES = ["random", "stratified"]


def make(mode="random", seed=1234, weights=(0.4, 0.3, 0.2, 0.1), **kwargs):
    weights = weights if isinstance(weights, dict) else list(weights)
    return MixtureSampler(NAMES, SIZES, weights, seed, mode=mode, **kwargs)


def weight_schedule(step: int) -> list[float]:
    """A weight history that changes every step, with a domain switched off now and then (like DoReMi)."""
    rng = np.random.default_rng(step)
    weights = rng.random(len(NAMES)) + 0.01
    if step % 5 == 3:
        weights[step % len(NAMES)] = 0.0
    return weights.tolist()


def run(sampler, batch_sizes, schedule=None, start_step=0):
    """Draw one batch per step (setting the step's weights first if ``schedule``); concatenated output."""
    domains, samples = [], []
    for offset, batch_size in enumerate(batch_sizes):
        if schedule is not None:
            sampler.set_weights(schedule(start_step + offset))
        d, s = sampler.next_indices(batch_size)
        domains.append(d)
        samples.append(s)
    return np.concatenate(domains), np.concatenate(samples)


@pytest.fixture(autouse=True)
def quiet_wrap_logs():
    """The wrap messages are INFO on purpose; keep them out of the test output."""
    logger = logging.getLogger("megadoremi.data.sampler")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("mode", MODES)
def test_same_seed_and_weight_history_gives_same_stream(mode):
    first = run(make(mode), [16] * 30, weight_schedule)
    second = run(make(mode), [16] * 30, weight_schedule)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[0].dtype == np.int64 and first[1].dtype == np.int64


def test_different_seed_gives_different_stream():
    a = run(make(seed=1), [64] * 5)
    b = run(make(seed=2), [64] * 5)
    assert not np.array_equal(a[0], b[0])


def test_stratified_seed_changes_only_epoch_order():
    # Stratified domain choice is deterministic; the seed still reshuffles repeated epochs.
    a = run(make("stratified", seed=1), [64] * 10)
    b = run(make("stratified", seed=2), [64] * 10)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], b[1])


@pytest.mark.parametrize("mode", MODES)
def test_stream_does_not_depend_on_call_chunking(mode):
    whole = make(mode).next_indices(300)
    chunked = run(make(mode), [1, 7, 0, 92, 200])
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reshuffle_epochs", [True, False])
def test_resume_continues_the_exact_stream(mode, reshuffle_epochs):
    steps, resume_at, batch_size = 40, 17, 12
    full = run(make(mode, reshuffle_epochs=reshuffle_epochs), [batch_size] * steps, weight_schedule)

    before = make(mode, reshuffle_epochs=reshuffle_epochs)
    head = run(before, [batch_size] * resume_at, weight_schedule)
    state = json.loads(json.dumps(before.state_dict()))
    assert (np.array(state["cursors"]) > np.array(SIZES)).any(), "the test should cross domain wraps"

    # A fresh sampler built from the run's configuration (initial weights as the config gives them).
    after = make(mode, reshuffle_epochs=reshuffle_epochs)
    after.load_state_dict(state)
    np.testing.assert_array_equal(after.weights, before.weights)
    tail = run(after, [batch_size] * (steps - resume_at), weight_schedule, start_step=resume_at)

    np.testing.assert_array_equal(full[0], np.concatenate([head[0], tail[0]]))
    np.testing.assert_array_equal(full[1], np.concatenate([head[1], tail[1]]))
    assert after.state_dict() == make_and_run_state(mode, reshuffle_epochs, steps, batch_size)


def make_and_run_state(mode, reshuffle_epochs, steps, batch_size):
    sampler = make(mode, reshuffle_epochs=reshuffle_epochs)
    run(sampler, [batch_size] * steps, weight_schedule)
    return sampler.state_dict()


@pytest.mark.parametrize("mode", MODES)
def test_resume_without_set_weights_keeps_the_saved_weights(mode):
    full = run(make(mode), [10] * 8)
    before = make(mode)
    before.set_weights([0.0, 1.0, 1.0, 2.0])
    run(before, [10] * 3)
    after = make(mode)  # constructed with the config weights, not the ones in force
    after.load_state_dict(json.loads(json.dumps(before.state_dict())))
    np.testing.assert_array_equal(after.probabilities, [0.0, 0.25, 0.25, 0.5])
    reference = make(mode)
    reference.set_weights([0.0, 1.0, 1.0, 2.0])
    expected = run(reference, [10] * 8)
    got = run(after, [10] * 5)
    np.testing.assert_array_equal(expected[0][30:], got[0])
    np.testing.assert_array_equal(expected[1][30:], got[1])
    assert not np.array_equal(full[0], expected[0])


def test_state_dict_is_plain_json():
    sampler = make("stratified")
    run(sampler, [33] * 3)
    state = sampler.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert set(state) == {
        "version", "domain_names", "domain_sizes", "mode", "seed", "reshuffle_epochs",
        "weights", "cursors", "credit", "rng",
    }
    assert sum(state["cursors"]) == 99 == sampler.num_samples_drawn
    assert sampler.num_drawn_by_domain() == dict(zip(NAMES, state["cursors"]))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("domain_names", ["web", "code", "novels", "math"], "domain_names"),
        ("domain_sizes", [50, 23, 8, 1000], "'books': state 8 vs dataset 7"),
        ("mode", "stratified", "mode"),
        ("seed", 99, "seed"),
        ("reshuffle_epochs", False, "reshuffle_epochs"),
        ("version", 7, "version"),
        ("weights", [0.0, 0.0, 0.0, 0.0], "all weights are zero"),
        ("cursors", [1, 2, 3], "cursors"),
        ("cursors", [1, 2.5, 3, 4], "cursors"),
        ("credit", [0.0, float("nan"), 0.0, 0.0], "credit"),
        ("rng", {"bit_generator": "MT19937"}, "PCG64"),
        ("rng", {"bit_generator": "PCG64", "state": "x", "inc": "1", "has_uint32": 0, "uinteger": 0}, "PCG64"),
    ],
)
def test_load_state_dict_rejects_mismatches_and_changes_nothing(field, value, message):
    source = make()
    run(source, [20] * 2)
    state = json.loads(json.dumps(source.state_dict()))
    state[field] = value
    target = make()
    untouched = target.state_dict()
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert target.state_dict() == untouched


def test_load_state_dict_names_missing_fields():
    state = make().state_dict()
    del state["credit"]
    with pytest.raises(ValueError, match=r"lacks the fields \['credit'\]"):
        make().load_state_dict(state)


# ---------------------------------------------------------------- mixture fidelity
def test_random_mode_follows_the_weights():
    weights = np.array([0.5, 0.3, 0.15, 0.05])
    sampler = make("random", weights=weights)
    num_draws = 200_000
    domains, _ = run(sampler, [1000] * (num_draws // 1000))
    counts = np.bincount(domains, minlength=len(NAMES))
    np.testing.assert_array_equal(counts, sampler.num_drawn)
    expected = num_draws * weights
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 21.1  # 99.99% quantile of chi-square with 3 degrees of freedom
    # And after a change of weights the new mixture takes over from the next draw.
    sampler.set_weights([1.0, 0.0, 0.0, 3.0])
    domains, _ = sampler.next_indices(40_000)
    share = np.bincount(domains, minlength=len(NAMES)) / 40_000
    np.testing.assert_allclose(share, [0.25, 0.0, 0.0, 0.75], atol=0.01)


@pytest.mark.parametrize("weights", [(0.4, 0.3, 0.2, 0.1), (1 / 3, 1 / 7, 0.0, 0.5), (5, 1, 1, 1)])
def test_stratified_counts_stay_within_one_of_the_weights(weights):
    sampler = make("stratified", weights=weights)
    domains, _ = run(sampler, [37] * 30)
    probabilities = np.asarray(weights, dtype=float) / sum(weights)
    one_hot = np.eye(len(NAMES))[domains]  # (n, K)
    counts = np.cumsum(one_hot, axis=0)  # (n, K): counts after each prefix
    owed = np.arange(1, len(domains) + 1)[:, None] * probabilities[None, :]
    assert np.abs(counts - owed).max() < 1.0


def test_stratified_mode_follows_weight_changes():
    sampler = make("stratified")
    for step in range(20):
        weights = np.asarray(weight_schedule(step))
        domains, _ = sampler.next_indices(200)
        if step:  # weights set at the end of the previous step are in force for this batch
            counts = np.bincount(domains, minlength=len(NAMES))
            assert np.abs(counts - 200 * previous / previous.sum()).max() < 2.0
        sampler.set_weights(weights)
        previous = weights


@pytest.mark.parametrize("mode", MODES)
def test_zero_weight_domain_is_never_drawn(mode):
    for weights in ([0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]):
        domains, _ = make(mode, weights=weights).next_indices(5000)
        assert set(np.unique(domains).tolist()) == {i for i, w in enumerate(weights) if w > 0}
    # Switched off mid-run, after the domain has accumulated credit in stratified mode.
    sampler = make(mode, weights=[0.01, 1.0, 1.0, 1.0])
    sampler.next_indices(70)
    before = sampler.num_drawn[0]
    sampler.set_weights([0.0, 1.0, 1.0, 1.0])
    domains, _ = sampler.next_indices(5000)
    assert 0 not in domains and sampler.num_drawn[0] == before


def test_weights_by_name_and_unnormalized_weights():
    sampler = make()
    sampler.set_weights({"math": 2.0, "web": 2.0, "code": 0.0, "books": 4.0})
    np.testing.assert_array_equal(sampler.weights, [2.0, 0.0, 4.0, 2.0])
    np.testing.assert_array_equal(sampler.probabilities, [0.25, 0.0, 0.5, 0.25])


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "weights, message",
    [
        ([0.5, 0.5, 0.5], "got 3 weights .* for 4 domains"),
        ([0.5, float("nan"), 0.5, 0.5], "weight of domain 'code' is nan"),
        ([0.5, 0.5, float("inf"), 0.5], "weight of domain 'books' is inf"),
        ([0.5, 0.5, 0.5, -0.1], "weight of domain 'math' is -0.1"),
        ([0.0, 0.0, 0.0, 0.0], "all weights are zero"),
        ({"web": 1.0, "code": 1.0, "books": 1.0}, r"missing \['math'\]"),
        ({"web": 1.0, "code": 1.0, "books": 1.0, "math": 1.0, "law": 1.0}, r"unknown \['law'\]"),
        (["a", "b", "c", "d"], "sequence of numbers"),
    ],
)
def test_invalid_weights_raise_naming_the_problem(weights, message):
    with pytest.raises(ValueError, match=message):
        make(weights=weights)
    sampler = make()
    state = sampler.state_dict()
    with pytest.raises(ValueError, match=message):
        sampler.set_weights(weights)
    assert sampler.state_dict() == state


def test_invalid_construction_raises():
    with pytest.raises(ValueError, match=r"duplicate domain names: \['web'\]"):
        MixtureSampler(["web", "web"], [1, 1], [1, 1], 0)
    with pytest.raises(ValueError, match="got 1 domain sizes for 2 domains"):
        MixtureSampler(["a", "b"], [1], [1, 1], 0)
    with pytest.raises(ValueError, match="size of domain 'b'"):
        MixtureSampler(["a", "b"], [1, -3], [1, 1], 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        MixtureSampler(["a"], [1], [1], 0, mode="blend")
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler(["a"], [1], [1], -1)
    with pytest.raises(ValueError, match="domain_names is empty"):
        MixtureSampler([], [], [], 0)
    with pytest.raises(ValueError, match="domain 'b' has weight 1.0 but no samples"):
        MixtureSampler(["a", "b"], [5, 0], [1, 1], 0)
    with pytest.raises(ValueError, match="n must be"):
        make().next_indices(-1)
    # An empty domain is fine while its weight is zero.
    domains, samples = MixtureSampler(["a", "b"], [5, 0], [1, 0], 0).next_indices(12)
    assert (domains == 0).all() and sorted(samples[:5].tolist()) == list(range(5))


# ---------------------------------------------------------------- per-domain epochs
def per_domain_sequences(domains, samples):
    return {d: samples[domains == d] for d in range(len(NAMES))}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reshuffle_epochs", [True, False])
def test_each_domain_epoch_is_a_permutation(mode, reshuffle_epochs):
    sampler = make(mode, reshuffle_epochs=reshuffle_epochs)
    domains, samples = run(sampler, [25] * 40, weight_schedule)
    for d, sequence in per_domain_sequences(domains, samples).items():
        size = SIZES[d]
        num_full = len(sequence) // size
        assert num_full >= 1 or d == 3
        epochs = [sequence[e * size:(e + 1) * size] for e in range(num_full)]
        for epoch in epochs:
            assert sorted(epoch.tolist()) == list(range(size))
        partial = sequence[num_full * size:]
        assert len(set(partial.tolist())) == len(partial)  # the unfinished epoch repeats nothing either
        if epochs:  # the first epoch is the dataset's own order: sample index = cursor % size
            np.testing.assert_array_equal(epochs[0], np.arange(size))
        if reshuffle_epochs and size > 20 and num_full >= 2:
            assert not np.array_equal(epochs[0], epochs[1])
        if not reshuffle_epochs:
            np.testing.assert_array_equal(sequence, np.arange(len(sequence)) % size)
    np.testing.assert_array_equal(sampler.epochs, sampler.num_drawn // np.array(SIZES))


def test_permute_positions_is_a_bijection_for_awkward_sizes():
    keys = np.random.SeedSequence(3).generate_state(4, dtype=np.uint64)
    for size in [1, 2, 3, 4, 5, 15, 16, 17, 1000, 65_537]:
        permuted = permute_positions(np.arange(size), size, keys)
        assert permuted.dtype == np.int64
        np.testing.assert_array_equal(np.sort(permuted), np.arange(size))
    big = 3_000_000_000  # beyond int32: the map works on int64 positions without materializing the epoch
    positions = np.array([0, 1, big - 1, 2**31 + 5])
    out = permute_positions(positions, big, keys)
    assert ((out >= 0) & (out < big)).all() and len(set(out.tolist())) == len(out)


def test_wraps_are_logged_once_per_domain_epoch():
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("megadoremi.data.sampler")
    handler = Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        sampler = MixtureSampler(["tiny", "big"], [4, 10_000], [1.0, 1.0], 0, mode="stratified")
        sampler.next_indices(8)  # tiny: cursors 0..3, epoch 1 starts at cursor 4 (the 8th draw is cursor 3)
        sampler.next_indices(2)  # tiny: cursor 4 -> epoch 1
        sampler.next_indices(20)  # tiny: cursors 5..14 -> epochs 2 and 3 in one call
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2
    assert "'tiny'" in records[0] and "epoch 1" in records[0]
    assert "'tiny'" in records[1] and "epochs 2..3" in records[1]


# ---------------------------------------------------------------- ranks and micro-batches
def global_batches(num_ranks, micro_batch_size, accumulation_steps, num_steps, mode):
    """Rebuild each step's global batch from what every rank would feed its model, in rank-major order."""
    global_batch_size = num_ranks * micro_batch_size * accumulation_steps
    samplers = [make(mode) for _ in range(num_ranks)]  # one identical sampler per rank
    batches = []
    for step in range(num_steps):
        per_rank = []
        for rank, sampler in enumerate(samplers):
            sampler.set_weights(weight_schedule(step))
            domains, samples = sampler.next_indices(global_batch_size)
            mine = rank_slice(global_batch_size, rank, num_ranks)
            domains, samples = domains[mine], samples[mine]
            micro = [
                (domains[m * micro_batch_size:(m + 1) * micro_batch_size],
                 samples[m * micro_batch_size:(m + 1) * micro_batch_size])
                for m in range(accumulation_steps)
            ]
            per_rank.extend(micro)
        batches.append((np.concatenate([d for d, _ in per_rank]), np.concatenate([s for _, s in per_rank])))
    return batches


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_see_the_same_global_stream_as_one_rank(mode):
    two_ranks = global_batches(num_ranks=2, micro_batch_size=8, accumulation_steps=1, num_steps=12, mode=mode)
    one_rank = global_batches(num_ranks=1, micro_batch_size=16, accumulation_steps=1, num_steps=12, mode=mode)
    accumulated = global_batches(num_ranks=1, micro_batch_size=8, accumulation_steps=2, num_steps=12, mode=mode)
    for a, b, c in zip(two_ranks, one_rank, accumulated):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], c[0])
        np.testing.assert_array_equal(a[1], c[1])


def test_rank_slice_convention_and_errors():
    assert rank_slice(16, 0, 2) == slice(0, 8)
    assert rank_slice(16, 1, 2) == slice(8, 16)
    assert rank_slice(12, 2, 3) == slice(8, 12)
    with pytest.raises(ValueError, match="not divisible"):
        rank_slice(10, 0, 3)
    with pytest.raises(ValueError, match="rank must be"):
        rank_slice(12, 3, 3)


@pytest.mark.parametrize("mode", MODES)
def test_setting_the_same_weights_again_changes_nothing(mode):
    plain = run(make(mode), [9] * 10)
    reset_every_step = run(make(mode), [9] * 10, schedule=lambda step: [0.4, 0.3, 0.2, 0.1])
    np.testing.assert_array_equal(plain[0], reset_every_step[0])
    np.testing.assert_array_equal(plain[1], reset_every_step[1])


GOLDEN_RANDOM_DOMAINS = [1, 2, 2, 0, 0, 2, 0, 2, 2, 1, 0, 0, 0, 1, 1, 1, 3, 2, 1, 3, 0, 0, 1, 0]
GOLDEN_RANDOM_SAMPLES = [0, 0, 1, 0, 1, 2, 2, 3, 4, 1, 3, 4, 5, 2, 3, 4, 0, 5, 5, 1, 6, 7, 6, 8]
GOLDEN_STRATIFIED_DOMAINS = [0, 1, 2, 0, 1, 3, 0, 2, 1, 0, 0, 1]
GOLDEN_STRATIFIED_SAMPLES = [16, 12, 3, 17, 13, 4, 18, 5, 14, 19, 20, 15]  # 'books' (size 7) is in epoch 1


def test_stream_is_pinned():
    # Checkpoints outlive code versions: a change here silently changes every resumed run's data order.
    domains, samples = run(make("random", seed=7), [12, 12])
    assert domains.tolist() == GOLDEN_RANDOM_DOMAINS
    assert samples.tolist() == GOLDEN_RANDOM_SAMPLES
    sampler = make("stratified", seed=7)
    sampler.next_indices(40)
    domains, samples = sampler.next_indices(12)
    assert domains.tolist() == GOLDEN_STRATIFIED_DOMAINS
    assert samples.tolist() == GOLDEN_STRATIFIED_SAMPLES
