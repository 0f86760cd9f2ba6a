"""Training and evaluation batches for one rank, cut from a global sample stream.

Step t's global batch is samples ``[t * G, (t + 1) * G)`` of the blended training dataset (G = global batch).
Data-parallel rank r takes the contiguous block ``[r * G / R, (r + 1) * G / R)`` and splits it into
``grad_accum`` consecutive micro-batches. So (2 ranks x micro b), (1 rank x micro 2b) and (1 rank x 2
accumulation steps of b) see exactly the same global batches, and resuming at step t needs only t.
"""

import numpy as np
import torch

from megadoremi.data.sampler import rank_slice
from megadoremi.train.plan import BatchPlan


def collate(items: list[dict], positions=None) -> dict:
    """Stack samples: tokens (batch, seq + 1) int64, domain_ids (batch,) int64, and their stream positions."""
    tokens = torch.from_numpy(np.stack([np.asarray(item["tokens"], dtype=np.int64) for item in items]))
    domain_ids = torch.tensor([int(item["domain_id"]) for item in items], dtype=torch.int64)
    batch = {"tokens": tokens, "domain_ids": domain_ids}
    if positions is not None:
        batch["positions"] = torch.as_tensor(list(positions), dtype=torch.int64)
    return batch


class TrainBatches:
    """The micro-batches of one rank for a given optimizer step."""

    def __init__(self, dataset, plan: BatchPlan, data_parallel_rank: int):
        self.dataset = dataset
        self.plan = plan
        self.dp_rank = data_parallel_rank
        needed = plan.global_batch_size
        if len(dataset) < needed:
            raise ValueError(f"training dataset has {len(dataset)} samples, one step needs {needed}")

    def num_steps_available(self) -> int:
        return len(self.dataset) // self.plan.global_batch_size

    def micro_batches(self, step: int) -> list[dict]:
        plan = self.plan
        block = rank_slice(plan.global_batch_size, self.dp_rank, plan.data_parallel_size)
        start = step * plan.global_batch_size + block.start
        if step * plan.global_batch_size + plan.global_batch_size > len(self.dataset):
            raise IndexError(f"step {step} needs samples beyond the training dataset ({len(self.dataset)})")
        batches = []
        for micro in range(plan.grad_accum):
            first = start + micro * plan.micro_batch_size
            positions = range(first, first + plan.micro_batch_size)
            batches.append(collate([self.dataset[i] for i in positions], positions))
        return batches


def eval_micro_batches(dataset, domain_id: int, plan: BatchPlan, data_parallel_rank: int,
                       max_samples: int, multiple_of: int = 1, batch_size: int | None = None) -> list[dict]:
    """This rank's share of a domain's validation samples, as micro-batches.

    Every rank gets the same number of micro-batches (ZeRO-3 gathers parameters collectively in every forward,
    and the pipeline evaluates ``multiple_of`` micro-batches per call).

    - ``batch_size`` given (no pipeline): exactly the first ``min(len(dataset), max_samples)`` samples, whatever
      the layout, so validation losses agree across data-parallel sizes. Rank r takes the r-th of R contiguous,
      as-equal-as-possible shares and cuts it into ``ceil(largest share / batch_size)`` micro-batches of at most
      ``batch_size``; a rank left without samples for a micro-batch gets one sample marked ``"padding": True``
      (run forward to keep the collectives in step, not counted).
    - ``batch_size`` None (pipeline stages, which need fixed micro-batch shapes): micro-batches of
      ``plan.micro_batch_size``, the count rounded down to a multiple of data-parallel size x micro batch x
      ``multiple_of``.
    """
    dp_size = plan.data_parallel_size
    if batch_size is None:
        per_round = dp_size * plan.micro_batch_size * multiple_of
        count = (min(len(dataset), max_samples) // per_round) * per_round
        per_rank = count // dp_size
        first = data_parallel_rank * per_rank
        return [collate([{"tokens": dataset[i], "domain_id": domain_id}
                         for i in range(offset, offset + plan.micro_batch_size)])
                for offset in range(first, first + per_rank, plan.micro_batch_size)]
    count = min(len(dataset), max_samples)
    bounds = [count * r // dp_size for r in range(dp_size + 1)]
    largest = max(bounds[r + 1] - bounds[r] for r in range(dp_size))
    num_batches = -(-largest // batch_size)
    mine = np.arange(bounds[data_parallel_rank], bounds[data_parallel_rank + 1])
    batches = []
    for chunk in np.array_split(mine, num_batches) if num_batches else []:
        if chunk.size == 0:
            batch = collate([{"tokens": dataset[0], "domain_id": domain_id}])
            batch["padding"] = True
        else:
            batch = collate([{"tokens": dataset[int(i)], "domain_id": domain_id} for i in chunk])
        batches.append(batch)
    return batches
