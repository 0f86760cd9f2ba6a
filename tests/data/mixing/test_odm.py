"""ODM against hand computations (MIXING.md section 3): the warm-up, the exploration rate, the smoothed-mean update
of the authors' code, the paper and exp3 variants, unobserved domains, and the checkpointed state."""

import math

import numpy as np
import pytest
import torch

from megadoremi.data.mixing.odm import ODMPolicy, exploration_rate
from megadoremi.distributed.stats import DomainStats

NAMES = ["web", "code", "math"]
PRIOR = np.array([0.5, 0.3, 0.2])


def stats(sums, tokens, samples):
    result = DomainStats(3)
    result.add_totals(torch.tensor(sums, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64),
                      torch.tensor(samples, dtype=torch.float64))
    return result


# Three steps of (sums, tokens, samples): mean losses (2, 3, 1.5), then (2.5, -, 1) with code absent, then (1, 2, 4).
STEPS = [([20.0, 30.0, 15.0], [10.0, 10.0, 10.0], [5.0, 5.0, 5.0]),
         ([25.0, 0.0, 10.0], [10.0, 0.0, 10.0], [5.0, 0.0, 5.0]),
         ([5.0, 20.0, 40.0], [5.0, 10.0, 10.0], [2.0, 5.0, 5.0])]


def test_exploration_rate():
    assert exploration_rate(22, 2001) == pytest.approx(0.0083795, abs=5e-8)
    assert exploration_rate(3, 1) == 1 / 3  # capped at 1/K
    assert exploration_rate(3, 100) == pytest.approx(math.sqrt(math.log(3) / 300), abs=1e-15)


def test_warmup_discards_rewards_and_keeps_the_prior():
    policy = ODMPolicy(NAMES, PRIOR, warmup_steps=2, smoothing=0.9)
    assert policy.update(0, stats(*STEPS[0])) is None and policy.update(1, stats(*STEPS[1])) is None
    assert policy.rewards.tolist() == [0.0, 0.0, 0.0]
    weights = policy.update(2, stats(*STEPS[2]))  # T = 3 > warm-up: the first update
    assert weights is not None and policy.completed_steps == 3


def test_smoothed_mean_update_by_hand():
    a = 0.9
    policy = ODMPolicy(NAMES, PRIOR, warmup_steps=0, smoothing=a)
    rewards = [0.0, 0.0, 0.0]
    for step, (sums, tokens, samples) in enumerate(STEPS):
        weights = policy.update(step, stats(sums, tokens, samples))
        epsilon = min(1 / 3, math.sqrt(math.log(3) / (3 * (step + 1))))
        for k in range(3):
            if tokens[k] > 0:
                rewards[k] = a * rewards[k] + (1 - a) * math.exp(sums[k] / tokens[k])
        expected = [(1 - 3 * epsilon) * r / sum(rewards) + epsilon for r in rewards]
        expected = [w / sum(expected) for w in expected]
        np.testing.assert_allclose(policy.rewards, rewards, rtol=0, atol=1e-12)
        np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-12)
        assert policy.epsilon == pytest.approx(epsilon, abs=1e-15)
    # Step 2 (index 1) did not observe "code": its reward was not touched (0.9 * R + 0.1 * e^3 from step 0 only).
    assert rewards[1] == pytest.approx(0.9 * (0.1 * math.exp(3.0)) + 0.1 * math.exp(2.0))
    assert abs(weights.sum() - 1) < 1e-15 and (weights > 0).all()


@pytest.mark.parametrize("variant", ["paper", "exp3"])
def test_softmax_variants_by_hand(variant):
    a = 0.5
    policy = ODMPolicy(NAMES, PRIOR, warmup_steps=0, smoothing=a, variant=variant)
    rewards, pi, previous_epsilon = [0.0, 0.0, 0.0], list(PRIOR), 1 / 3
    for step, (sums, tokens, samples) in enumerate(STEPS):
        weights = policy.update(step, stats(sums, tokens, samples))
        epsilon = min(1 / 3, math.sqrt(math.log(3) / (3 * (step + 1))))
        draws = sum(samples)
        for k in range(3):
            if tokens[k] > 0:
                q = 1 - (1 - pi[k]) ** draws  # observation probability under per-sample mixing
                reward = sums[k] / tokens[k] / q
                rewards[k] = a * rewards[k] + (1 - a) * reward if variant == "paper" else rewards[k] + 0.1 * reward
        exps = [math.exp(previous_epsilon * r) for r in rewards]
        pi = [(1 - 3 * epsilon) * e / sum(exps) + epsilon for e in exps]
        pi = [w / sum(pi) for w in pi]
        previous_epsilon = epsilon
        np.testing.assert_allclose(policy.rewards, rewards, rtol=0, atol=1e-12)
        np.testing.assert_allclose(weights, pi, rtol=0, atol=1e-12)


def test_state_round_trip_continues_identically():
    first = ODMPolicy(NAMES, PRIOR, warmup_steps=1, smoothing=0.5, variant="paper")
    for step in range(2):
        first.update(step, stats(*STEPS[step]))
    resumed = ODMPolicy(NAMES, PRIOR, warmup_steps=1, smoothing=0.5, variant="paper")
    resumed.load_state_dict(first.state_dict())
    np.testing.assert_array_equal(resumed.update(2, stats(*STEPS[2])), first.update(2, stats(*STEPS[2])))
    with pytest.raises(ValueError, match="variant"):
        ODMPolicy(NAMES, PRIOR, warmup_steps=1, smoothing=0.5).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="variant"):
        ODMPolicy(NAMES, PRIOR, warmup_steps=1, smoothing=0.5, variant="greedy")
