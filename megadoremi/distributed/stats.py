"""Per-domain statistics of a step: float64 sums, token counts and sample counts, reduced with one all-reduce.

One class serves every consumer: the trainer's per-domain training loss, DoReMi's per-domain excess loss and the
mixture policy's view of the step. Each micro-batch adds its rows; at the end of the optimizer step
``reduced(group)`` sums the three length-k vectors over the data-parallel group in one collective, so every
rank holds the same global numbers. Means are taken only after the reduction (never averages of per-rank
means), and only where a domain has tokens. Reductions take the process group as an argument.
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

    def add(self, values: torch.Tensor, domain_ids: torch.Tensor) -> None:
        """Add one micro-batch: per-token ``values`` (batch, seq), ``domain_ids`` (batch,); values are detached."""
        domain_ids = domain_ids.to(self.device)
        rows = values.detach().to(torch.float64).sum(dim=1).to(self.device)  # (batch,)
        self.sums.index_add_(0, domain_ids, rows)
        self.tokens.index_add_(0, domain_ids, torch.full_like(rows, values.shape[1]))
        self.samples.index_add_(0, domain_ids, torch.ones_like(rows))

    def add_totals(self, sums: torch.Tensor, tokens: torch.Tensor, samples: torch.Tensor) -> None:
        """Add per-domain totals computed elsewhere (e.g. masked excess losses), three (k,) vectors."""
        self.sums += sums.to(self.device, torch.float64)
        self.tokens += tokens.to(self.device, torch.float64)
        self.samples += samples.to(self.device, torch.float64)

    def reduced(self, group=None, contributes: bool = True) -> "DomainStats":
        """A new DomainStats with the SUM over ``group`` (every rank of it must call this); local values kept.

        ``contributes=False`` adds zeros instead of this rank's values: with pipeline stages only the last stage
        sees losses, so an all-reduce over the whole world (``group=None``) with the other stages contributing
        zeros both reduces over the last stage's data-parallel ranks and hands the result to every stage.
        """
        packed = torch.cat([self.sums, self.tokens, self.samples])
        if not contributes:
            packed = torch.zeros_like(packed)
        packed = all_reduce_sum(packed, group)
        result = DomainStats(self.num_domains, self.device)
        k = self.num_domains
        result.sums, result.tokens, result.samples = packed[:k], packed[k:2 * k], packed[2 * k:]
        return result

    def mean(self) -> float:
        """Sum over all domains divided by all tokens (the step's token-mean value); nan without tokens."""
        total = float(self.tokens.sum())
        return float(self.sums.sum()) / total if total > 0 else float("nan")

    def domain_means(self, names) -> dict[str, float]:
        """``{domain: sums / tokens}`` for the domains that have tokens."""
        sums, tokens = self.sums.cpu().numpy(), self.tokens.cpu().numpy()
        return {name: float(sums[d] / tokens[d]) for d, name in enumerate(names) if tokens[d] > 0}

    def domain_samples(self, names) -> dict[str, int]:
        """``{domain: samples}`` for every domain."""
        return {name: int(count) for name, count in zip(names, self.samples.cpu().tolist())}
