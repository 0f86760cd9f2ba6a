"""Validation statistics in process: the standard error of each domain's mean loss from its samples, and the
validation set's identity (sample counts and hash) from the data and eval.seed alone."""

import numpy as np
import pytest
import torch

from megadoremi.train.evaluation import ValidationStats, standard_errors


def test_standard_errors_from_the_samples_mean_losses():
    rng = np.random.default_rng(0)
    losses = rng.uniform(1, 5, size=(7, 4))
    domain_ids = np.array([0, 1, 0, 0, 1, 1, 2])
    stats = ValidationStats(3, "cpu")
    for rows in (slice(0, 3), slice(3, 7)):  # two micro-batches
        stats.add(torch.tensor(losses[rows], dtype=torch.float32), torch.tensor(domain_ids[rows]))
    errors = standard_errors(stats.losses, stats.squares, ["a", "b", "c"])
    assert set(errors) == {"a", "b"}  # "c" has one sample: no standard error
    for d, name in enumerate(["a", "b"]):
        means = losses[domain_ids == d].astype(np.float32).mean(axis=1, dtype=np.float64)
        assert errors[name] == pytest.approx(means.std(ddof=1) / np.sqrt(means.size), rel=1e-6)
