"""Training and evaluation micro-batches for one rank, cut from the global sample stream.

Step t's global batch is positions ``[t * G, (t + 1) * G)`` of the training stream (``megadoremi.data.stream``;
G = global batch). Data-parallel rank r takes the contiguous block ``[r * G / R, (r + 1) * G / R)`` and splits it
into ``grad_accum`` consecutive micro-batches. So (2 ranks x micro b), (1 rank x micro 2b) and (1 rank x 2
accumulation steps of b) see exactly the same global batches.

A micro-batch is a dict: ``tokens`` (batch, seq + 1) int64, ``domain_ids`` (batch,) int64 and, for training,
``positions`` (batch,) int64, the samples' positions in the stream (rows of a reference-loss cache),
``domain_counts`` (k,) int64 numpy, its samples per domain, and ``step_domain_counts`` (k,) int64 numpy, the
samples per domain of the step's whole global batch (all ranks). The domain ids are checked against
[0, k) here, once, on the host: the training step then indexes with them on the device (an out-of-range
``index_add_`` on CUDA is a device-side assert) and counts per domain without a device-to-host transfer.
The ``plan`` arguments are a ``megadoremi.distributed.plan.BatchPlan``.
"""

import numpy as np
import torch

from megadoremi.data.sampler import rank_slice


def collate(items: list[dict], positions=None) -> dict:
    """Stack samples: tokens (batch, seq + 1) int64, domain_ids (batch,) int64, and their stream positions."""
    tokens = torch.from_numpy(np.stack([np.asarray(item["tokens"], dtype=np.int64) for item in items]))
    domain_ids = torch.tensor([int(item["domain_id"]) for item in items], dtype=torch.int64)
    batch = {"tokens": tokens, "domain_ids": domain_ids}
    if positions is not None:
        batch["positions"] = torch.as_tensor(list(positions), dtype=torch.int64)
    return batch


class TrainBatches:
    """The micro-batches of one data-parallel rank for a given optimizer step, read from a training stream."""

    def __init__(self, stream, plan, data_parallel_rank: int):
        if stream.global_batch_size != plan.global_batch_size:
            raise ValueError(f"the training stream serves global batches of {stream.global_batch_size} samples, "
                             f"the batch plan has {plan.global_batch_size}")
        self.stream = stream
        self.plan = plan
        self.dp_rank = data_parallel_rank
        self.num_domains = len(stream.domain_names)

    def micro_batches(self, step: int) -> list[dict]:
        """``grad_accum`` micro-batches of ``micro_batch_size`` samples (this rank's block of step's batch)."""
        plan, k = self.plan, self.num_domains
        step_ids = self.stream.domain_ids(step)  # (G,) the whole global batch's domains
        if step_ids.size and (step_ids.min() < 0 or step_ids.max() >= k):
            bad = step_ids[(step_ids < 0) | (step_ids >= k)]
            raise ValueError(f"training stream, step {step}: domain ids must lie in [0, {k}), got {bad[:8].tolist()}")
        step_counts = np.bincount(step_ids, minlength=k)
        block = rank_slice(plan.global_batch_size, self.dp_rank, plan.data_parallel_size)
        batches = []
        for micro in range(plan.grad_accum):
            first = block.start + micro * plan.micro_batch_size
            offsets = range(first, first + plan.micro_batch_size)
            positions = range(step * plan.global_batch_size + first, step * plan.global_batch_size + offsets.stop)
            items = self.stream.read(step, offsets)
            ids = step_ids[offsets.start:offsets.stop]
            if [int(item["domain_id"]) for item in items] != ids.tolist():
                raise RuntimeError(f"training stream, step {step}: domain_ids(step) disagrees with the samples read")
            batch = collate(items, positions)
            batch["domain_counts"] = np.bincount(ids, minlength=k)
            batch["step_domain_counts"] = step_counts
            batches.append(batch)
        return batches


def eval_micro_batches(dataset, domain_id: int, plan, data_parallel_rank: int,
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
