"""Per-domain statistics of a step: float64 sums, token counts and sample counts, reduced with one all-reduce.

One class serves every consumer: the trainer's per-domain training loss, DoReMi's per-domain excess loss and the
mixture policy's view of the step. Each micro-batch adds its rows; at the end of the optimizer step
``reduced(group)`` sums the three length-k vectors over the data-parallel group in one collective, so every
rank holds the same global numbers. Means are taken only after the reduction (never averages of per-rank
means), and only where a domain has tokens. Reductions take the process group as an argument.

Host transfers: ``reduce_together`` packs several statistics (the trainer's and an objective's) into one vector,
all-reduces it once and copies it to the host once; every reader of a reduced result (``numpy``, ``mean``,
``domain_means``, ``domain_samples``, the mixture policies, the DRO update) reads that host copy. That copy is
the one device-to-host synchronisation of a training step (``tests/train/test_host_sync.py``).
"""

import numpy as np
import torch
import torch.distributed as dist


def all_reduce_sum(vector: torch.Tensor, group=None) -> torch.Tensor:
    """SUM of ``vector`` over ``group`` (None: the default group), as a new tensor; a copy when not distributed."""
    result = vector.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(result, op=dist.ReduceOp.SUM, group=group)
    return result


def broadcast_array(array: np.ndarray, device="cpu", src: int = 0) -> np.ndarray:
    """Rank ``src``'s float64 ``array`` on every rank (every rank passes an array of the same shape); the array
    itself when not distributed. Used for results computed on one rank only (ADO's curve fit)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return array
    tensor = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float64)).to(device)
    dist.broadcast(tensor, src=src)
    return tensor.cpu().numpy()


class DomainStats:
    """``sums`` (k,), ``tokens`` (k,) and ``samples`` (k,), float64 on ``device``.

    ``add(values, domain_ids)`` adds a micro-batch of per-token values (batch, seq): each row's sum to its
    domain's sum, its number of counted tokens to ``tokens`` and 1 to ``samples``. The device must suit the
    group's backend when reduced (CPU for gloo, the rank's GPU for NCCL).
    """

    def __init__(self, num_domains: int, device="cpu"):
        if isinstance(num_domains, bool) or not isinstance(num_domains, int | np.integer) or num_domains < 1:
            raise ValueError(f"num_domains must be an integer >= 1, got {num_domains!r}")
        self.num_domains = int(num_domains)
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Zero all three vectors (start of a step)."""
        self.sums = torch.zeros(self.num_domains, dtype=torch.float64, device=self.device)
        self.tokens = torch.zeros(self.num_domains, dtype=torch.float64, device=self.device)
        self.samples = torch.zeros(self.num_domains, dtype=torch.float64, device=self.device)
        self._host = None  # (sums, tokens, samples) float64 numpy: the copy numpy() returns

    def add(self, values: torch.Tensor, domain_ids: torch.Tensor) -> None:
        """Add one micro-batch: per-token ``values`` (batch, seq), ``domain_ids`` (batch,); values are detached."""
        domain_ids = domain_ids.to(self.device)
        rows = values.detach().to(torch.float64).sum(dim=1).to(self.device)  # (batch,)
        self.sums.index_add_(0, domain_ids, rows)
        self.tokens.index_add_(0, domain_ids, torch.full_like(rows, values.shape[1]))
        self.samples.index_add_(0, domain_ids, torch.ones_like(rows))
        self._host = None

    def add_totals(self, sums: torch.Tensor, tokens: torch.Tensor, samples: torch.Tensor) -> None:
        """Add per-domain totals computed elsewhere (e.g. masked excess losses), three (k,) vectors."""
        self.sums += sums.to(self.device, torch.float64)
        self.tokens += tokens.to(self.device, torch.float64)
        self.samples += samples.to(self.device, torch.float64)
        self._host = None

    def reduced(self, group=None, contributes: bool = True) -> "DomainStats":
        """A new DomainStats with the SUM over ``group`` (every rank of it must call this); local values kept.

        ``contributes=False`` adds zeros instead of this rank's values: with pipeline stages only the last stage
        sees losses, so an all-reduce over the whole world (``group=None``) with the other stages contributing
        zeros both reduces over the last stage's data-parallel ranks and hands the result to every stage.
        """
        return reduce_together([self], group, contributes)[0]

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sums, tokens, samples) as float64 numpy arrays (k,): the host copy a reduction made, or one copy now."""
        if self._host is None:
            k = self.num_domains
            host = torch.cat([self.sums, self.tokens, self.samples]).cpu().numpy().copy()
            host.setflags(write=False)
            self._host = (host[:k], host[k:2 * k], host[2 * k:])
        return self._host

    def mean(self) -> float:
        """Sum over all domains divided by all tokens (the step's token-mean value); nan without tokens."""
        sums, tokens, _ = self.numpy()
        total = float(tokens.sum())
        return float(sums.sum()) / total if total > 0 else float("nan")

    def domain_means(self, names) -> dict[str, float]:
        """``{domain: sums / tokens}`` for the domains that have tokens."""
        sums, tokens, _ = self.numpy()
        return {name: float(sums[d] / tokens[d]) for d, name in enumerate(names) if tokens[d] > 0}

    def domain_samples(self, names) -> dict[str, int]:
        """``{domain: samples}`` for every domain."""
        return {name: int(count) for name, count in zip(names, self.numpy()[2])}


def reduce_together(stats: list["DomainStats"], group=None, contributes: bool = True) -> list["DomainStats"]:
    """``[s.reduced(group, contributes) for s in stats]`` with one all-reduce and one device-to-host copy.

    Every rank of ``group`` must call this with statistics of the same sizes, in the same order (all on one
    device). Each result holds its device tensors and the host copy ``numpy()`` returns.
    """
    if not stats:
        return []
    packed = torch.cat([torch.cat([s.sums, s.tokens, s.samples]) for s in stats])
    if not contributes:
        packed = torch.zeros_like(packed)
    packed = all_reduce_sum(packed, group)
    host = packed.cpu().numpy().copy()  # the step's one wait for the device; a copy on CPU too (same on both)
    host.setflags(write=False)  # every reader shares it
    results, offset = [], 0
    for s in stats:
        k = s.num_domains
        result = DomainStats(k, s.device)
        result.sums, result.tokens, result.samples = (packed[offset:offset + k], packed[offset + k:offset + 2 * k],
                                                      packed[offset + 2 * k:offset + 3 * k])
        result._host = (host[offset:offset + k], host[offset + k:offset + 2 * k], host[offset + 2 * k:offset + 3 * k])
        results.append(result)
        offset += 3 * k
    return results
