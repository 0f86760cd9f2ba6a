"""The DoReMi proxy objective in process (no subprocess, no DeepSpeed engine): built from explicit arguments, it
gives the loss and the alpha of the pure math, computed here by hand, for a hand-made batch."""

import math

import numpy as np
import pytest
import torch

from megadoremi.config import DoReMiConfig
from megadoremi.distributed.plan import BatchPlan
from megadoremi.doremi.proxy import DoReMiObjective, resolve_order

NAMES = ["web", "code", "math"]
VOCAB = 50
# Two sequences of 3 predicted tokens: row 0 is "web", row 1 is "code"; "math" is absent.
DOMAIN_IDS = torch.tensor([0, 1])
PROXY = [[2.0, 3.0, 1.0], [4.0, 0.5, 2.5]]
REFERENCE = torch.tensor([[1.0, 3.5, 0.0], [1.0, 1.0, 1.0]])


class FixedReference:
    """Per-token reference losses given by hand, like a cache read (the objective only calls ``losses``)."""

    def __init__(self, rows):
        self.rows = rows

    def losses(self, batch):
        return self.rows[batch["positions"]]


def plan(micro_batch_size, grad_accum):
    return BatchPlan(world_size=1, pipeline_stages=1, data_parallel_size=1, micro_batch_size=micro_batch_size,
                     grad_accum=grad_accum, global_batch_size=micro_batch_size * grad_accum, seq_length=3)


def batch(rows):
    return {"tokens": torch.zeros(len(rows), 4, dtype=torch.int64), "domain_ids": DOMAIN_IDS[rows],
            "positions": torch.tensor(rows), "domain_counts": np.bincount(DOMAIN_IDS[rows].numpy(), minlength=3)}


def step_batches(*micro_rows):
    """One optimizer step's micro-batches as ``TrainBatches`` gives them (one rank): with the global batch's
    samples per domain, from which the objective takes the global token counts."""
    batches = [batch(rows) for rows in micro_rows]
    step_counts = sum(b["domain_counts"] for b in batches)
    for b in batches:
        b["step_domain_counts"] = step_counts
    return batches


def end_step(objective):
    """What the loop does at the end of a step: reduce the objective's ``step_stats`` (one rank) and pass them."""
    return objective.end_step(*(stats.reduced() for stats in objective.step_stats))


def algorithm_1(weights, excess, step_size, smoothing):
    """DoReMi Algorithm 1 in plain floats: alpha' = alpha * exp(eta * lambda), normalise, mix with uniform."""
    unnormalized = [w * math.exp(step_size * lam) for w, lam in zip(weights, excess)]
    return [(1 - smoothing) * u / sum(unnormalized) + smoothing / len(weights) for u in unnormalized]


# By hand: clipped excess per token, web: max(2-1,0) + max(3-3.5,0) + max(1-0,0) = 1 + 0 + 1 = 2 over 3 tokens;
# code: 3 + 0 + 1.5 = 4.5 over 3 tokens; math absent: lambda_0 = log(50).
LAMBDA_1 = [2.0 / 3.0, 1.5, math.log(VOCAB)]
ALPHA_1 = algorithm_1([1 / 3] * 3, LAMBDA_1, 1.0, 1e-3)


def make(order, micro_batch_size, grad_accum, objective="paper"):
    config = DoReMiConfig(enabled=True, reference_losses="hand-made", order=order, objective=objective)
    return DoReMiObjective(config, NAMES, VOCAB, [0.5, 0.3, 0.2], FixedReference(REFERENCE),
                           plan(micro_batch_size, grad_accum))


def test_same_step_updates_alpha_before_the_loss():
    objective = make("same_step", micro_batch_size=2, grad_accum=1)
    [micro] = step_batches([0, 1])
    objective.begin_step([micro])
    losses = torch.tensor(PROXY, requires_grad=True)
    loss = objective.loss(losses, micro)
    np.testing.assert_allclose(objective.state.weights, ALPHA_1, rtol=0, atol=1e-15)
    np.testing.assert_allclose(objective.state.excess_loss, LAMBDA_1, rtol=0, atol=1e-15)
    # Eq. 1 with alpha_1: sum_d alpha_d * mean token loss of domain d (math is absent: no term).
    expected = ALPHA_1[0] * (2 + 3 + 1) / 3 + ALPHA_1[1] * (4 + 0.5 + 2.5) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    expected_grad = torch.tensor([[ALPHA_1[0] / 3] * 3, [ALPHA_1[1] / 3] * 3])
    torch.testing.assert_close(losses.grad, expected_grad)
    metrics = end_step(objective)  # same_step: nothing more to update at the end of the step
    assert metrics["doremi_alpha"] == pytest.approx(dict(zip(NAMES, ALPHA_1)), abs=1e-15)
    assert metrics["doremi_excess_loss"] == pytest.approx(dict(zip(NAMES, LAMBDA_1)), abs=1e-15)
    assert objective.state.step == 1


def test_lagged_two_micro_batches_use_the_previous_alpha_and_update_from_the_global_batch():
    objective = make("lagged", micro_batch_size=1, grad_accum=2)
    micro_batches = step_batches([0], [1])
    objective.begin_step(micro_batches)
    losses = [torch.tensor([row], requires_grad=True) for row in PROXY]
    values = [objective.loss(loss, micro) for loss, micro in zip(losses, micro_batches)]
    # Step 1's losses use alpha_0 (uniform), normalised by the global per-domain token counts (3 each) and scaled
    # by A = 2 accumulation steps, so DeepSpeed's average over micro-batches gives Eq. 1 on the global batch.
    assert values[0].item() == pytest.approx(2 * (1 / 3) * 6 / 3)
    assert values[1].item() == pytest.approx(2 * (1 / 3) * 7 / 3)
    assert ((values[0] + values[1]) / 2).item() == pytest.approx((1 / 3) * 6 / 3 + (1 / 3) * 7 / 3)
    np.testing.assert_allclose(objective.state.weights, [1 / 3] * 3, atol=0)  # not yet updated
    metrics = end_step(objective)
    np.testing.assert_allclose(objective.state.weights, ALPHA_1, rtol=0, atol=1e-15)
    assert metrics["doremi_alpha"]["math"] == pytest.approx(ALPHA_1[2], abs=1e-15)
    # Step 2: only "code" is sampled; web and math keep their lambda.
    step2 = step_batches([1], [1])
    objective.begin_step(step2)
    values = [objective.loss(torch.tensor([PROXY[1]]), micro) for micro in step2]
    assert values[0].item() == pytest.approx(2 * ALPHA_1[1] * 7 / 6)  # alpha_1, global code tokens = 6
    end_step(objective)
    lambda_2 = [LAMBDA_1[0], 1.5, LAMBDA_1[2]]
    np.testing.assert_allclose(objective.state.weights, algorithm_1(ALPHA_1, lambda_2, 1.0, 1e-3), atol=1e-15)
    np.testing.assert_allclose(objective.state.average_weights,
                               (np.array(ALPHA_1) + objective.state.weights) / 2, atol=1e-15)


def test_official_objective_weights_tokens_by_alpha_over_sampling():
    objective = make("same_step", micro_batch_size=2, grad_accum=1, objective="official")
    [micro] = step_batches([0, 1])
    objective.begin_step([micro])
    loss = objective.loss(torch.tensor(PROXY), micro)
    ratio = np.array(ALPHA_1) / np.array([0.5, 0.3, 0.2])
    w = ratio / ratio.sum()  # per-domain token weight
    expected = (w[0] * 6 + w[1] * 7) / (w[0] * 3 + w[1] * 3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_state_round_trip_and_order_resolution():
    objective = make("lagged", micro_batch_size=1, grad_accum=2)
    micro_batches = step_batches([0], [1])
    objective.begin_step(micro_batches)
    for loss, micro in zip(PROXY, micro_batches):
        objective.loss(torch.tensor([loss]), micro)
    end_step(objective)
    restored = make("lagged", micro_batch_size=1, grad_accum=2)
    restored.load_state_dict(objective.state_dict())
    np.testing.assert_array_equal(restored.state.weights, objective.state.weights)
    assert restored.state.step == 1 and restored.log_record() == objective.log_record()
    assert resolve_order("auto", plan(2, 1)) == "same_step" and resolve_order("auto", plan(1, 2)) == "lagged"
    with pytest.raises(ValueError, match="same_step needs one micro-batch"):
        make("same_step", micro_batch_size=1, grad_accum=2)
    with pytest.raises(ValueError, match="needs the reduced step_stats"):
        objective.end_step()
    with pytest.raises(ValueError, match="domain"):
        make("lagged", 1, 2).load_state_dict({**objective.state_dict(), "domain_names": ["a", "b", "c"]})
