"""DoReMi math: weight update vs hand-worked numbers and an independent Algorithm-1 reference, excess-loss
statistics, split invariance of the proxy objectives (value and gradient), and the checkpointable DRO state.
(The reduction of the statistics over ranks is tested in tests/distributed/test_stats.py.)"""

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megadoremi.doremi import (
    DROState,
    average_weights,
    count_domain_tokens,
    domain_excess_loss,
    excess_loss_stats,
    initial_excess_loss,
    max_weight_change,
    proxy_loss,
    update_domain_weights,
)


def reference_update(weights, excess_loss, step_size, smoothing):
    """DoReMi Algorithm 1, literally: alpha' = alpha * exp(eta * lambda), normalise, mix with uniform.

    Plain Python floats and math.exp (no log space, no numpy): an implementation independent of the package's.
    """
    unnormalized = [w * math.exp(step_size * lam) for w, lam in zip(weights, excess_loss)]
    total = sum(unnormalized)
    k = len(weights)
    return [(1.0 - smoothing) * u / total + smoothing / k for u in unnormalized]


# ---------------------------------------------------------------------------------------------------------
# update_domain_weights

def test_update_hand_worked_two_domains():
    # k=2, alpha=[0.5, 0.5], lambda=[1, 0], eta=1, c=0:
    #   alpha * exp(lambda) = [0.5e, 0.5]  ->  normalised [e / (e + 1), 1 / (e + 1)]
    #   e = 2.718281828459045, e + 1 = 3.718281828459045
    #   e / (e + 1) = 0.7310585786300049,  1 / (e + 1) = 0.2689414213699951
    result = update_domain_weights(np.array([0.5, 0.5]), np.array([1.0, 0.0]), step_size=1.0, smoothing=0.0)
    np.testing.assert_allclose(result, [0.7310585786300049, 0.2689414213699951], rtol=0, atol=1e-15)
    # Same with c=0.1: (1 - 0.1) * a' + 0.1 / 2
    #   0.9 * 0.7310585786300049 + 0.05 = 0.65795272076700441 + 0.05 = 0.70795272076700441
    #   0.9 * 0.2689414213699951 + 0.05 = 0.24204727923299559 + 0.05 = 0.29204727923299559
    result = update_domain_weights(np.array([0.5, 0.5]), np.array([1.0, 0.0]), step_size=1.0, smoothing=0.1)
    np.testing.assert_allclose(result, [0.70795272076700441, 0.29204727923299559], rtol=0, atol=1e-15)


def test_update_hand_worked_three_domains():
    # k=3, alpha=[0.2, 0.3, 0.5], lambda=[ln 3, ln 2, 0], eta=1, c=0:
    #   alpha * exp(lambda) = [0.2 * 3, 0.3 * 2, 0.5 * 1] = [0.6, 0.6, 0.5], sum 1.7 -> [6/17, 6/17, 5/17]
    weights, lam = [0.2, 0.3, 0.5], [math.log(3), math.log(2), 0.0]
    np.testing.assert_allclose(update_domain_weights(weights, lam, 1.0, 0.0), [6 / 17, 6 / 17, 5 / 17],
                               rtol=0, atol=1e-15)
    # eta=0.5 with doubled lambdas is the same step.
    np.testing.assert_allclose(update_domain_weights(weights, [2 * x for x in lam], 0.5, 0.0),
                               [6 / 17, 6 / 17, 5 / 17], rtol=0, atol=1e-15)
    # c=0.3: 0.7 * 6/17 + 0.1 = (4.2 + 1.7) / 17 = 5.9/17;  0.7 * 5/17 + 0.1 = (3.5 + 1.7) / 17 = 5.2/17
    np.testing.assert_allclose(update_domain_weights(weights, lam, 1.0, 0.3), [5.9 / 17, 5.9 / 17, 5.2 / 17],
                               rtol=0, atol=1e-15)
    # eta=0: only the smoothing acts: 0.7 * [0.2, 0.3, 0.5] + 0.1 = [0.24, 0.31, 0.45]
    np.testing.assert_allclose(update_domain_weights(weights, lam, 0.0, 0.3), [0.24, 0.31, 0.45],
                               rtol=0, atol=1e-15)


def test_update_matches_algorithm_1_on_random_inputs():
    rng = random.Random(1234)
    for _ in range(500):
        k = rng.randint(1, 9)
        raw = [rng.random() if rng.random() > 0.15 else 0.0 for _ in range(k)]
        if sum(raw) == 0:
            raw[0] = 1.0
        weights = [w / sum(raw) for w in raw]
        lam = [rng.uniform(0.0, 10.0) for _ in range(k)]
        eta, c = rng.uniform(0.0, 3.0), rng.choice([0.0, 1e-3, rng.random(), 1.0])
        expected = reference_update(weights, lam, eta, c)
        np.testing.assert_allclose(update_domain_weights(np.array(weights), np.array(lam), eta, c), expected,
                                   rtol=0, atol=1e-12)


def test_update_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(1, 8))
        weights = rng.dirichlet(np.ones(k))
        lam = rng.uniform(0, 5, size=k)
        from_numpy = update_domain_weights(weights, lam, 0.7, 0.01)
        from_torch = update_domain_weights(torch.from_numpy(weights), torch.from_numpy(lam), 0.7, 0.01)
        assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float64
        assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.float64
        assert np.array_equal(from_numpy, from_torch.numpy())
    # float32 tensors in: float64 tensor out, on the input's device; inputs untouched.
    weights32 = torch.tensor([0.25, 0.75], dtype=torch.float32)
    out = update_domain_weights(weights32, torch.tensor([1.0, 2.0]))
    assert out.dtype == torch.float64 and out.device == weights32.device
    assert torch.equal(weights32, torch.tensor([0.25, 0.75], dtype=torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_update_keeps_cuda_device():
    weights = torch.tensor([0.5, 0.5], device="cuda")
    out = update_domain_weights(weights, torch.tensor([1.0, 0.0], device="cuda"), 1.0, 0.0)
    assert out.device == weights.device
    np.testing.assert_allclose(out.cpu().numpy(), [0.7310585786300049, 0.2689414213699951], atol=1e-15)


def test_update_extreme_lambdas_do_not_overflow():
    # exp(1000) overflows float64 (max ~1.8e308 = e^709.78); the log-space step does not.
    with pytest.raises(OverflowError):
        reference_update([0.5, 0.5], [1e3, 0.0], 1.0, 1e-3)
    # a' = [1, e^-1000 ~ 0] -> alpha = 0.999 * [1, 0] + 0.001 / 2 = [0.9995, 0.0005]
    result = update_domain_weights([0.5, 0.5], [1e3, 0.0], 1.0, 1e-3)
    np.testing.assert_allclose(result, [0.9995, 0.0005], rtol=0, atol=1e-15)
    # eta * lambda = 1e5 and equal huge lambdas: the latter is a no-op before smoothing.
    result = update_domain_weights([0.2, 0.3, 0.5], [1e3, 1e3, 1e3], 100.0, 0.0)
    np.testing.assert_allclose(result, [0.2, 0.3, 0.5], rtol=0, atol=1e-14)
    assert np.isfinite(update_domain_weights([0.5, 0.5], [1e3, -1e3], 100.0, 0.0)).all()


def test_update_floor_and_sum():
    rng = np.random.default_rng(1)
    weights = np.full(5, 0.2)
    for _ in range(200):  # drive weights towards one-hot: the floor c/k must hold at every step
        weights = update_domain_weights(weights, rng.uniform(0, 50, size=5) * np.array([1, 0, 0, 0, 0]), 1.0, 1e-3)
        assert weights.min() >= 1e-3 / 5 - 1e-18
        assert abs(weights.sum() - 1.0) < 1e-12
    # A zero weight stays zero before smoothing (log 0 = -inf).
    np.testing.assert_allclose(update_domain_weights([0.0, 1.0], [5.0, 0.0], 1.0, 0.0), [0.0, 1.0], atol=0)


@pytest.mark.parametrize("weights, lam, kwargs, match", [
    ([0.5, 0.5], [1.0], {}, "one entry per domain"),
    ([], [], {}, "at least one domain"),
    ([[0.5, 0.5]], [[1.0, 0.0]], {}, "1-D"),
    ([0.6, 0.6], [1.0, 0.0], {}, "sum to 1"),
    ([1.5, -0.5], [1.0, 0.0], {}, ">= 0"),
    ([float("nan"), 1.0], [1.0, 0.0], {}, "finite"),
    ([0.5, 0.5], [float("inf"), 0.0], {}, "excess_loss must be finite"),
    ([0.5, 0.5], [1.0, 0.0], {"smoothing": 1.5}, "smoothing"),
    ([0.5, 0.5], [1.0, 0.0], {"smoothing": -0.1}, "smoothing"),
    ([0.5, 0.5], [1.0, 0.0], {"step_size": -1.0}, "step_size"),
    ([0.5, 0.5], [1.0, 0.0], {"step_size": float("nan")}, "step_size"),
])
def test_update_rejects_bad_input(weights, lam, kwargs, match):
    with pytest.raises(ValueError, match=match):
        update_domain_weights(weights, lam, **kwargs)


def test_average_weights_and_change():
    np.testing.assert_allclose(average_weights(np.array([0.6, 1.4]), 2), [0.3, 0.7], atol=1e-15)
    assert isinstance(average_weights(torch.tensor([1.0, 3.0]), 4), torch.Tensor)
    with pytest.raises(ValueError, match="num_steps"):
        average_weights([1.0, 1.0], 0)
    assert max_weight_change([0.3, 0.7], [0.3005, 0.6995]) == pytest.approx(5e-4)


# ---------------------------------------------------------------------------------------------------------
# excess-loss statistics

def test_excess_is_clipped_per_token_before_aggregation():
    proxy = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    reference = torch.tensor([[1.0, 3.0], [1.5, 2.5]])
    # Domain 0 (row 0): per-token excess [2, -2] -> clipped [2, 0] -> mean 1.
    #   Mean-then-clip would give max(mean(3, 1) - mean(1, 3), 0) = 0.
    # Domain 1 (row 1): [0.5, -0.5] -> [0.5, 0] -> mean 0.25 (mean-then-clip: 0).
    sums, counts = excess_loss_stats(proxy, reference, torch.tensor([0, 1]), 3)
    assert sums.dtype == counts.dtype == torch.float64
    assert sums.tolist() == [2.0, 0.5, 0.0] and counts.tolist() == [2.0, 2.0, 0.0]
    lam = domain_excess_loss(sums, counts, previous=np.array([7.0, 7.0, 7.0]))
    np.testing.assert_allclose(lam, [1.0, 0.25, 7.0])  # domain 2 absent: keeps its previous lambda
    assert isinstance(lam, np.ndarray)
    assert isinstance(domain_excess_loss(sums, counts, torch.zeros(3)), torch.Tensor)


def test_excess_stats_mask_and_absent_domains():
    proxy = torch.tensor([[5.0, 1.0, 9.0], [4.0, 4.0, 4.0], [2.0, 3.0, 0.0]])
    reference = torch.tensor([[1.0, 0.0, float("nan")], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 0]])
    domain_ids = torch.tensor([0, 1, 0])
    sums, counts = excess_loss_stats(proxy, reference, domain_ids, 2, loss_mask=mask)
    # Domain 0: tokens (5-1), (1-0), (2-1), (3-1) = 4 + 1 + 1 + 2 = 8 over 4 tokens; masked NaN ignored.
    # Domain 1: every token masked -> absent.
    assert sums.tolist() == [8.0, 0.0] and counts.tolist() == [4.0, 0.0]
    assert torch.equal(counts, count_domain_tokens(domain_ids, 2, loss_mask=mask))
    lam = domain_excess_loss(sums, counts, initial_excess_loss(2, 512))
    np.testing.assert_allclose(lam, [2.0, math.log(512)])
    # A bool mask works like an int one; without a mask every token counts.
    assert torch.equal(excess_loss_stats(proxy, reference, domain_ids, 2, loss_mask=mask.bool())[0], sums)
    assert count_domain_tokens(domain_ids, 2, seq_length=3).tolist() == [6.0, 3.0]


def test_initial_excess_loss():
    np.testing.assert_allclose(initial_excess_loss(3, 256_000), [math.log(256_000)] * 3, rtol=0, atol=0)
    with pytest.raises(ValueError, match="vocab_size"):
        initial_excess_loss(3, 0)


def test_excess_stats_reject_bad_input():
    losses = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"domain_ids must lie in \[0, 2\)"):
        excess_loss_stats(losses, losses, torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="reference_losses"):
        excess_loss_stats(losses, torch.zeros(2, 4), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="loss_mask"):
        excess_loss_stats(losses, losses, torch.tensor([0, 1]), 2, loss_mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="integer"):
        excess_loss_stats(losses, losses, torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="counts must be >= 0"):
        domain_excess_loss([1.0], [-1.0], [0.0])


# ---------------------------------------------------------------------------------------------------------
# proxy objectives: split invariance

NUM_DOMAINS, VOCAB, FEATURES = 4, 7, 5
ALPHA = np.array([0.1, 0.2, 0.3, 0.4])
SAMPLING = np.array([0.4, 0.3, 0.2, 0.1])


def _toy_batch(seed=0):
    """8 sequences of 6 tokens from a linear 'model' (features (8, 6, 5) @ W (5, 7)); domain 3 is absent."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(8, 6, FEATURES, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (8, 6), generator=generator)
    domain_ids = torch.tensor([0, 1, 0, 2, 2, 0, 1, 0])
    mask = (torch.rand(8, 6, generator=generator) > 0.25).long()
    mask[3] = 0  # a fully masked sequence
    weight = torch.randn(FEATURES, VOCAB, generator=generator, dtype=torch.float64)
    return features, targets, domain_ids, mask, weight


def _token_losses(features, targets, weight):
    logits = features @ weight  # (batch, seq, vocab)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none").view(targets.shape)


def _explicit_objective(losses, domain_ids, mask, objective):
    """The single-batch objectives written out directly from their definitions."""
    mask = mask.to(losses.dtype)
    if objective == "paper":
        total = 0.0
        for d in range(NUM_DOMAINS):
            rows = domain_ids == d
            count = mask[rows].sum()
            if count > 0:
                total = total + ALPHA[d] * (losses[rows] * mask[rows]).sum() / count
        return total
    w = (ALPHA / SAMPLING) / (ALPHA / SAMPLING).sum()
    token_w = torch.from_numpy(w)[domain_ids][:, None] * mask
    return (token_w * losses).sum() / token_w.sum()


def _single_batch(objective, seed=0):
    features, targets, domain_ids, mask, weight = _toy_batch(seed)
    weight.requires_grad_(True)
    losses = _token_losses(features, targets, weight)
    value = proxy_loss(losses, domain_ids, ALPHA, objective, sampling_weights=SAMPLING, loss_mask=mask)
    value.backward()
    explicit = _explicit_objective(losses.detach(), domain_ids, mask, objective)
    assert abs(value.item() - float(explicit)) < 1e-12
    return value.item(), weight.grad.clone()


SPLITS = {
    # rank -> list of micro-batches (row indices); num_micro_batches = A, dp_size = D.
    "1 rank x 1": [[list(range(8))]],
    "2 ranks x 4": [[[0, 1, 2, 3]], [[4, 5, 6, 7]]],
    "1 rank x 2 accum of 4": [[[0, 1, 2, 3], [4, 5, 6, 7]]],
    "2 ranks x 2 accum of 2": [[[0, 1], [2, 3]], [[4, 5], [6, 7]]],
    "uneven": [[[0], [1, 2, 3]], [[4, 5, 6], [7]]],
    "4 ranks x 2 accum of 1": [[[0], [1]], [[2], [3]], [[4], [5]], [[6], [7]]],
}


def _split_batch(objective, split, global_counts=True, seed=0):
    """Per-micro-batch losses as DeepSpeed combines them: backward(loss / A) on each, gradients averaged over D."""
    features, targets, domain_ids, mask, weight = _toy_batch(seed)
    weight.requires_grad_(True)
    dp_size, num_micro = len(split), len(split[0])
    # Global counts: per rank, the sum over its micro-batches; then the SUM all-reduce over ranks.
    counts = sum(count_domain_tokens(domain_ids[rows], NUM_DOMAINS, loss_mask=mask[rows])
                 for micro_batches in split for rows in micro_batches)
    total = 0.0
    for micro_batches in split:
        for rows in micro_batches:
            losses = _token_losses(features[rows], targets[rows], weight)
            kwargs = dict(domain_token_counts=counts, num_micro_batches=num_micro, dp_size=dp_size) \
                if global_counts else {}
            loss = proxy_loss(losses, domain_ids[rows], ALPHA, objective, sampling_weights=SAMPLING,
                              loss_mask=mask[rows], **kwargs)
            (loss / (num_micro * dp_size)).backward()
            total += loss.item() / (num_micro * dp_size)
    return total, weight.grad.clone()


@pytest.mark.parametrize("objective", ["paper", "official"])
@pytest.mark.parametrize("split_name", list(SPLITS))
def test_objective_split_invariance(objective, split_name):
    value, grad = _single_batch(objective)
    split_value, split_grad = _split_batch(objective, SPLITS[split_name])
    assert abs(split_value - value) < 1e-12
    torch.testing.assert_close(split_grad, grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("objective", ["paper", "official"])
def test_per_micro_batch_normalisation_is_not_split_invariant(objective):
    # Guards the test above from being vacuous: local normalisation (a mean of means) differs.
    value, grad = _single_batch(objective)
    split_value, split_grad = _split_batch(objective, SPLITS["uneven"], global_counts=False)
    assert abs(split_value - value) > 1e-3
    assert (split_grad - grad).abs().max() > 1e-3


def test_official_objective_with_alpha_equal_to_sampling_is_the_token_mean():
    features, targets, domain_ids, mask, weight = _toy_batch()
    losses = _token_losses(features, targets, weight)
    value = proxy_loss(losses, domain_ids, SAMPLING, "official", sampling_weights=SAMPLING, loss_mask=mask)
    expected = (losses * mask).sum() / mask.sum()
    assert abs(value.item() - expected.item()) < 1e-12


def test_objective_edge_cases():
    losses = torch.ones(2, 3, requires_grad=True)
    domain_ids = torch.tensor([0, 1])
    zero_mask = torch.zeros(2, 3)
    for objective in ("paper", "official"):  # nothing counted: a zero loss that still backpropagates
        value = proxy_loss(losses, domain_ids, [0.5, 0.5], objective, sampling_weights=[0.5, 0.5],
                           loss_mask=zero_mask)
        assert value.item() == 0.0
        value.backward()
    # Alpha is a constant: a gradient it carries is dropped, the value uses it.
    alpha = torch.tensor([0.25, 0.75], requires_grad=True)
    assert proxy_loss(torch.ones(2, 3), domain_ids, alpha).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="objective"):
        proxy_loss(losses, domain_ids, [0.5, 0.5], "hardest")
    with pytest.raises(ValueError, match="sampling_weights"):
        proxy_loss(losses, domain_ids, [0.5, 0.5], "official")
    with pytest.raises(ValueError, match="domain_token_counts"):
        proxy_loss(losses, domain_ids, [0.5, 0.5], num_micro_batches=2)
    with pytest.raises(ValueError, match="fewer"):
        proxy_loss(losses, domain_ids, [0.5, 0.5], domain_token_counts=[3.0, 2.0])
    with pytest.raises(ValueError, match="one entry per domain"):
        proxy_loss(losses, domain_ids, [0.5, 0.5], domain_token_counts=[3.0, 3.0, 3.0])
    # The training step's path: local counts from the data layer (ids already checked) give the same loss.
    counted = proxy_loss(torch.ones(2, 3), domain_ids, [0.25, 0.75], domain_token_counts=[3.0, 3.0])
    given = proxy_loss(torch.ones(2, 3), domain_ids, [0.25, 0.75], domain_token_counts=[3.0, 3.0],
                       local_token_counts=[3.0, 3.0])
    assert given.item() == counted.item()
    with pytest.raises(ValueError, match="not both"):
        proxy_loss(losses, domain_ids, [0.5, 0.5], loss_mask=zero_mask, local_token_counts=[3.0, 3.0])


# ---------------------------------------------------------------------------------------------------------
# DROState

NAMES = ["web", "code", "math"]
STEPS = [  # (sums, counts) of successive global batches; "math" is absent from the second one
    ([3.0, 1.0, 0.5], [4.0, 2.0, 1.0]),
    ([2.0, 6.0, 0.0], [1.0, 3.0, 0.0]),
    ([0.0, 0.3, 9.0], [5.0, 1.0, 3.0]),
    ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]),
]


def _manual_trajectory(initial_weights, vocab_size, step_size, smoothing):
    weights, lam, history = list(initial_weights), [math.log(vocab_size)] * 3, []
    for sums, counts in STEPS:
        lam = [s / c if c > 0 else previous for s, c, previous in zip(sums, counts, lam)]
        weights = reference_update(weights, lam, step_size, smoothing)
        history.append((weights, lam))
    return history


def test_dro_state_update_matches_manual_computation():
    state = DROState.initial(NAMES, vocab_size=100, initial_weights=[0.2, 0.3, 0.5], step_size=0.7,
                             smoothing=0.01)
    np.testing.assert_allclose(state.average_weights, [0.2, 0.3, 0.5])  # step 0: the initial weights
    np.testing.assert_allclose(state.excess_loss, [math.log(100)] * 3)
    history = _manual_trajectory([0.2, 0.3, 0.5], 100, 0.7, 0.01)
    for step, ((sums, counts), (weights, lam)) in enumerate(zip(STEPS, history), start=1):
        state.update(torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64))
        assert state.step == step
        if step == 2:  # "math" absent from the second global batch: it keeps lambda_1 = 0.5 / 1
            assert state.excess_loss[2] == 0.5
        np.testing.assert_allclose(state.weights, weights, rtol=0, atol=1e-12)
        np.testing.assert_allclose(state.excess_loss, lam, rtol=0, atol=1e-12)
    alpha_bar = [sum(weights[d] for weights, _ in history) / len(history) for d in range(3)]
    np.testing.assert_allclose(state.average_weights, alpha_bar, rtol=0, atol=1e-12)
    record = state.trajectory_record()
    assert record["step"] == 4 and list(record["weights"]) == NAMES
    assert record["excess_loss"]["math"] == 0.5
    json.dumps(record)


def test_dro_state_absent_domain_keeps_lambda():
    state = DROState.initial(NAMES, vocab_size=100)
    state.update(*STEPS[0])
    state.update(*STEPS[1])
    np.testing.assert_allclose(state.excess_loss, [2.0, 2.0, 0.5])


def test_dro_state_json_round_trip_and_resume():
    uninterrupted = DROState.initial(NAMES, vocab_size=50, initial_weights={"web": 2, "code": 1, "math": 1})
    np.testing.assert_allclose(uninterrupted.weights, [0.5, 0.25, 0.25])
    for sums, counts in STEPS:
        uninterrupted.update(sums, counts)

    state = DROState.initial(NAMES, vocab_size=50, initial_weights={"web": 2, "code": 1, "math": 1})
    for sums, counts in STEPS[:2]:
        state.update(sums, counts)
    saved = json.dumps(state.to_dict())
    resumed = DROState.from_dict(json.loads(saved), domain_names=NAMES)
    assert resumed.to_dict() == state.to_dict()  # floats round-trip exactly
    for sums, counts in STEPS[2:]:
        resumed.update(sums, counts)
    assert resumed.to_dict() == uninterrupted.to_dict()
    assert np.array_equal(resumed.average_weights, uninterrupted.average_weights)


def test_dro_state_rejects_mismatched_or_corrupt_state():
    data = DROState.initial(NAMES, vocab_size=50).to_dict()
    with pytest.raises(ValueError, match=r"missing \['wiki'\], unexpected \['math'\]"):
        DROState.from_dict(data, domain_names=["web", "code", "wiki"])
    with pytest.raises(ValueError, match="different order"):
        DROState.from_dict(data, domain_names=["code", "web", "math"])
    with pytest.raises(ValueError, match="missing \\['step'\\]"):
        DROState.from_dict({key: value for key, value in data.items() if key != "step"})
    with pytest.raises(ValueError, match="weights must sum to 1"):
        DROState.from_dict({**data, "weights": [0.5, 0.5, 0.5]})
    with pytest.raises(ValueError, match="weight_sum sums to"):
        DROState.from_dict({**data, "step": 2})
    with pytest.raises(ValueError, match="3 domains"):
        DROState.from_dict({**data, "excess_loss": [1.0, 2.0]})
    with pytest.raises(ValueError, match="unique"):
        DROState.initial(["a", "a"], vocab_size=50)
    with pytest.raises(ValueError, match="initial_weights must name exactly"):
        DROState.initial(NAMES, vocab_size=50, initial_weights={"web": 1.0})
    state = DROState.initial(NAMES, vocab_size=50)
    before = state.to_dict()
    with pytest.raises(ValueError, match="sums must be finite"):
        state.update([float("nan"), 0.0, 0.0], [1.0, 1.0, 1.0])
    assert state.to_dict() == before  # a failed update leaves the state untouched
