"""Validation micro-batches: every sample exactly once whatever the layout, the same number of forward calls on
every rank (ZeRO-3 gathers collectively), padding marked and never counted."""

import numpy as np
import pytest

from megadoremi.data.batches import eval_micro_batches
from megadoremi.distributed.plan import BatchPlan


class Samples:
    """Sample i is a row of tokens all equal to i."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full(5, i, dtype=np.int32)


def plan(dp: int, micro: int = 4, accum: int = 1, stages: int = 1) -> BatchPlan:
    return BatchPlan(world_size=dp * stages, pipeline_stages=stages, data_parallel_size=dp, micro_batch_size=micro,
                     grad_accum=accum, global_batch_size=dp * micro * accum, seq_length=4)


@pytest.mark.parametrize("size, max_samples, dp, batch", [
    (100, 7, 2, 3), (100, 7, 1, 3), (100, 64, 3, 8), (5, 64, 2, 8), (2, 64, 4, 1), (9, 9, 4, 2), (0, 8, 2, 4),
])
def test_every_sample_once_same_call_count_on_every_rank(size, max_samples, dp, batch):
    per_rank = [eval_micro_batches(Samples(size), 3, plan(dp), rank, max_samples, batch_size=batch)
                for rank in range(dp)]
    assert len({len(batches) for batches in per_rank}) == 1  # the same number of forward calls
    seen = []
    for batches in per_rank:
        for b in batches:
            assert 1 <= b["tokens"].shape[0] <= batch
            assert b["domain_ids"].tolist() == [3] * b["tokens"].shape[0]
            if not b.get("padding"):
                seen.extend(b["tokens"][:, 0].tolist())
    assert sorted(seen) == list(range(min(size, max_samples)))  # exactly the first N, each once


def test_pipeline_form_keeps_fixed_micro_batches():
    batches = eval_micro_batches(Samples(100), 0, plan(2, micro=4, accum=2, stages=2), 1, 20, multiple_of=2)
    # 20 rounded down to a multiple of 2 ranks x 4 x 2 = 16: rank 1 takes samples 8..15 in two batches of 4.
    assert [b["tokens"][:, 0].tolist() for b in batches] == [[8, 9, 10, 11], [12, 13, 14, 15]]
