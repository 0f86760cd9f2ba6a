"""Blending indices: bit-for-bit equality with megatron-core's compiled helper, validation, and bounded work."""

import numpy as np
import pytest

from megadoremi.data import blending_indices as bi
from megadoremi.data.blending_indices import (
    _build_blending_indices_reference,
    build_blending_indices,
    normalize_weights,
)

# The Pile's weights (GPT-NeoX 22 domains, as in the DoReMi paper), rounded as published: entries down to 1e-4.
PILE_WEIGHTS = [
    0.1121, 0.1247, 0.0919, 0.0042, 0.0027, 0.1071, 0.1052, 0.0198, 0.0575, 0.0406, 0.0127,
    0.0184, 0.0155, 0.0118, 0.0077, 0.0145, 0.0097, 0.0065, 0.0042, 0.0001, 0.0013, 0.0002,
]  # fmt: skip


def _doremi_like(seed: int) -> np.ndarray:
    """DoReMi's smoothed weights: a peaked mixture mixed with 1e-3 of uniform, so entries sit near 1e-3 / 22."""
    raw = np.random.default_rng(seed).dirichlet(np.full(22, 0.2))
    return normalize_weights((1 - 1e-3) * raw + 1e-3 / 22)


def _dirichlet(alpha: float, num_domains: int, seed: int) -> np.ndarray:
    return normalize_weights(np.random.default_rng(seed).dirichlet(np.full(num_domains, alpha)))


WEIGHTS = {
    "uniform_2": normalize_weights([1, 1]),
    "uniform_3": normalize_weights([1, 1, 1]),
    "uniform_22": normalize_weights(np.ones(22)),
    "two_skewed": normalize_weights([0.9, 0.1]),
    "two_tiny": normalize_weights([1.0, 1e-6]),
    "half_quarter_quarter": np.array([0.5, 0.25, 0.25]),  # exact float ties
    "dyadic": np.array([0.5, 0.125, 0.125, 0.25]),
    "sevenths": normalize_weights([1, 2, 4]),
    "skewed": normalize_weights([100, 10, 1, 1, 0.1]),
    "near_ties": normalize_weights([0.25 + 1e-13, 0.25, 0.25 - 1e-13, 0.25, 1e-3]),  # errors a few ulps apart
    "pile": normalize_weights(PILE_WEIGHTS),
    "doremi_a": _doremi_like(1),
    "doremi_b": _doremi_like(2),
    "dir0.1_k22": _dirichlet(0.1, 22, 3),
    "dir0.3_k22": _dirichlet(0.3, 22, 4),
    "dir1_k22": _dirichlet(1.0, 22, 5),
    "dir10_k22": _dirichlet(10.0, 22, 6),
    "dir1_k5": _dirichlet(1.0, 5, 7),
    "dir0.3_k40": _dirichlet(0.3, 40, 8),  # float64 tie code (25..53 domains)
    "dir1_k60": _dirichlet(1.0, 60, 9),  # more domains than one code word holds: numpy argmax
    "unnormalized_low": np.array(PILE_WEIGHTS),  # sums to 0.7684: Megatron normalises first, the helper does not
    "unnormalized_high": 2.0 * _dirichlet(1.0, 8, 10),
}


@pytest.fixture(scope="module")
def helpers():
    return pytest.importorskip("megatron.core.datasets.helpers_cpp")


def megatron_indices(helpers, weights, size):
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    helpers.build_blending_indices(dataset_index, dataset_sample_index, weights, weights.size, size, False)
    return dataset_index, dataset_sample_index


def assert_same(ours, theirs):
    assert ours[0].dtype == np.int16 and ours[1].dtype == np.int64
    assert ours[0].shape == theirs[0].shape and ours[1].shape == theirs[1].shape
    mismatch = np.flatnonzero((ours[0] != theirs[0]) | (ours[1] != theirs[1]))
    assert mismatch.size == 0, (
        f"{mismatch.size} samples differ, first at {mismatch[0]}: ours {ours[0][mismatch[0]]}/{ours[1][mismatch[0]]} "
        f"megatron {theirs[0][mismatch[0]]}/{theirs[1][mismatch[0]]}"
    )


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_matches_megatron(helpers, name):
    weights = WEIGHTS[name]
    for size in (0, 1, 2, 3, 17, 1000, 40_000, 300_001):
        assert_same(build_blending_indices(weights, size), megatron_indices(helpers, weights, size))


@pytest.mark.parametrize("name", ["pile", "doremi_a", "dir1_k22", "dir0.3_k22", "half_quarter_quarter"])
def test_matches_megatron_millions(helpers, name):
    weights = WEIGHTS[name]
    size = 2_500_003
    assert_same(build_blending_indices(weights, size), megatron_indices(helpers, weights, size))


def test_many_random_weight_vectors(helpers):
    rng = np.random.default_rng(2024)
    for trial in range(24):
        num_domains = int(rng.integers(2, 30))
        alpha = float(rng.choice([0.1, 0.3, 1.0, 10.0]))
        weights = normalize_weights(rng.dirichlet(np.full(num_domains, alpha)))
        size = int(rng.integers(1, 200_000))
        assert_same(build_blending_indices(weights, size), megatron_indices(helpers, weights, size))


def test_threads_do_not_change_the_result(helpers):
    weights = WEIGHTS["doremi_b"]
    size = 1_000_000
    expected = megatron_indices(helpers, weights, size)
    for num_threads in (1, 2, 3):
        assert_same(build_blending_indices(weights, size, num_threads=num_threads), expected)


def test_result_does_not_depend_on_the_guesses(helpers, monkeypatch):
    """Lane-start guesses only decide how much is re-simulated: scrambled guesses give the same blend."""
    weights = WEIGHTS["pile"]
    size = 400_000
    expected = megatron_indices(helpers, weights, size)
    original = bi._Lanes._guess_counts
    rng = np.random.default_rng(0)

    def scrambled(self, starts):
        counts = original(self, starts)
        shift = rng.integers(-3, 4, size=counts.shape)
        shift -= shift.sum(axis=0, keepdims=True) * (np.arange(counts.shape[0]) == 0)[:, None]
        return counts + shift  # still sums to each start, often negative: any state is a valid guess

    monkeypatch.setattr(bi._Lanes, "_guess_counts", scrambled)
    assert_same(build_blending_indices(weights, size), expected)


def test_reference_loop_matches_megatron(helpers):
    for name in ("uniform_3", "half_quarter_quarter", "pile", "dir0.1_k22", "dir1_k60", "unnormalized_high"):
        weights = WEIGHTS[name]
        for size in (0, 1, 2, 5, 2_000):
            assert_same(_build_blending_indices_reference(weights, size), megatron_indices(helpers, weights, size))


def test_zero_weight_domains_are_never_selected(helpers):
    weights = normalize_weights([0.3, 0.0, 0.5, 0.0, 0.2])
    dataset_index, dataset_sample_index = build_blending_indices(weights, 50_000)
    assert set(np.unique(dataset_index).tolist()) == {0, 2, 4}
    # The positive domains blend exactly as Megatron blends them alone, under their original ids.
    positive = np.array([0, 2, 4])
    alone = megatron_indices(helpers, weights[positive], 50_000)
    assert_same((dataset_index, dataset_sample_index), (positive[alone[0]].astype(np.int16), alone[1]))


def test_megatron_helper_would_pick_a_zero_weight_domain_on_a_tie(helpers):
    """Why zeros are excluded: errors 0, 0, 0 at i = 2 tie and the C++ scan keeps the zero-weight domain 0."""
    weights = np.array([0.0, 0.5, 0.5])
    assert megatron_indices(helpers, weights, 3)[0].tolist() == [1, 2, 0]
    assert build_blending_indices(weights, 3)[0].tolist() == [1, 2, 1]


def test_single_domain():
    dataset_index, dataset_sample_index = build_blending_indices([3.0], 1000)
    assert (dataset_index == 0).all()
    assert (dataset_sample_index == np.arange(1000)).all()


def test_simulated_work_is_linear_in_size(monkeypatch):
    """The lanes simulate ~N steps in all (guess errors re-joined quickly), not a multiple that grows with N."""
    calls = {"lane_steps": 0}
    choose, resimulate_one = bi._Chooser.choose, bi._Lanes._resimulate_one

    def counting(self, counts, x, domain_out, flat_out):
        calls["lane_steps"] += x.size
        return choose(self, counts, x, domain_out, flat_out)

    def counting_one(self, pos, end, true, spec):
        result = resimulate_one(self, pos, end, true, spec)
        calls["lane_steps"] += result[0] - pos
        return result

    monkeypatch.setattr(bi._Chooser, "choose", counting)
    monkeypatch.setattr(bi._Lanes, "_resimulate_one", counting_one)
    weights = WEIGHTS["dir1_k22"]
    work = {}
    for size in (1_000_000, 2_000_000):
        calls["lane_steps"] = 0
        build_blending_indices(weights, size, num_threads=1)
        work[size] = calls["lane_steps"] / size
    assert work[1_000_000] < 1.3 and work[2_000_000] < 1.3, work


@pytest.mark.parametrize(
    "weights, message",
    [
        ([], "non-empty"),
        ([[0.5, 0.5]], "1-D"),
        ([0.5, float("nan")], r"weights\[1\] = nan"),
        ([0.5, float("inf")], r"weights\[1\] = inf"),
        ([0.5, -0.1], r"weights\[1\] = -0.1"),
        ([0.0, 0.0], "all zero"),
    ],
)
def test_normalize_weights_rejects(weights, message):
    with pytest.raises(ValueError, match=message):
        normalize_weights(weights)


def test_normalize_weights_matches_megatron_normalisation():
    raw = [3.0, 1.0, 0.0, 2.5]
    w = np.array(raw, dtype=np.float64)
    expected = w / np.sum(w)  # megatron.core.datasets.utils.normalize
    normalized = normalize_weights(raw)
    assert normalized.dtype == np.float64
    assert normalized.tobytes() == expected.tobytes()
    assert normalized[2] == 0.0


@pytest.mark.parametrize(
    "weights, size, message",
    [
        ([0.5, -0.5], 10, r"weights\[1\] = -0.5"),
        ([0.5, float("nan")], 10, r"weights\[1\] = nan"),
        ([0.0, 0.0], 10, "all zero"),
        ([], 10, "non-empty"),
        ([0.5, 0.5], -1, "size must be >= 0"),
    ],
)
def test_build_rejects(weights, size, message):
    with pytest.raises(ValueError, match=message):
        build_blending_indices(weights, size)
