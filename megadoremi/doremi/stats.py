"""Per-domain excess-loss statistics: two length-k float64 vectors (sums, counts) per micro-batch, and lambda_t.

DoReMi's lambda_t is a *global* statistic: for each domain, the clipped per-token excess loss summed over every
token of that domain in the whole global batch (all micro-batches of the step, all data-parallel ranks),
divided by the number of those tokens. So each micro-batch contributes sums and counts (``excess_loss_stats``),
they are added up over the step's micro-batches and all-reduced with SUM over the data-parallel group
(``megadoremi.distributed.stats.DomainStats``, the one per-domain statistics class), and only then divided
(``domain_excess_loss``). Averaging per-rank means would weight ranks instead of tokens; gathering per-token
tensors is unnecessary. Everything here is pure: no process groups.
"""

import math

import numpy as np
import torch

from megadoremi.doremi.weights import check_finite, like_input, to_float64_numpy


def check_domain_ids(domain_ids: torch.Tensor, batch_size: int, num_domains: int, check_range: bool = True
                     ) -> torch.Tensor:
    """Validate domain ids (batch,) against [0, num_domains); returns them as int64.

    The range check reads the ids on the host (a device-to-host wait for ids on a GPU); the training step passes
    ``check_range=False`` for ids the data layer has already checked (``megadoremi.data.batches``)."""
    if domain_ids.dtype.is_floating_point or domain_ids.dtype.is_complex or domain_ids.dtype == torch.bool:
        raise ValueError(f"domain_ids must be an integer tensor, got dtype {domain_ids.dtype}")
    if tuple(domain_ids.shape) != (batch_size,):
        raise ValueError(f"domain_ids must have shape (batch,) = ({batch_size},), got {tuple(domain_ids.shape)}")
    domain_ids = domain_ids.long()
    # Checked on the host because an out-of-range index_add_ on CUDA is a device-side assert, not an error.
    if check_range and batch_size and bool(((domain_ids < 0) | (domain_ids >= num_domains)).any()):
        raise ValueError(f"domain_ids must lie in [0, {num_domains}), got min {int(domain_ids.min())} and "
                         f"max {int(domain_ids.max())}")
    return domain_ids


def _check_num_domains(num_domains) -> int:
    if isinstance(num_domains, bool) or not isinstance(num_domains, int | np.integer) or num_domains < 1:
        raise ValueError(f"num_domains must be an integer >= 1, got {num_domains!r}")
    return int(num_domains)


def _token_mask(loss_mask, shape: tuple, device) -> torch.Tensor | None:
    """``loss_mask != 0`` as a bool tensor (batch, seq) on ``device``, or None when every token counts."""
    if loss_mask is None:
        return None
    loss_mask = torch.as_tensor(loss_mask, device=device)
    if tuple(loss_mask.shape) != shape:
        raise ValueError(f"loss_mask must have the losses' shape (batch, seq) = {shape}, got "
                         f"{tuple(loss_mask.shape)}")
    return loss_mask != 0


def count_domain_tokens(domain_ids, num_domains: int, loss_mask=None, seq_length: int | None = None
                        ) -> torch.Tensor:
    """Per-domain number of counted tokens (k,) float64: ``loss_mask != 0`` per row, or ``seq_length`` each.

    Needs only the data (domain ids and masks), not a forward pass: summed over a step's micro-batches and
    all-reduced (``DomainStats``), it gives the global counts ``proxy_loss(domain_token_counts=...)`` needs
    before the first backward of the step. Give exactly one of ``loss_mask`` (batch, seq) and ``seq_length``.
    """
    num_domains = _check_num_domains(num_domains)
    domain_ids = torch.as_tensor(domain_ids)
    if (loss_mask is None) == (seq_length is None):
        raise ValueError("give exactly one of loss_mask (batch, seq) and seq_length")
    if loss_mask is not None:
        loss_mask = torch.as_tensor(loss_mask)
        if loss_mask.dim() != 2:
            raise ValueError(f"loss_mask must have shape (batch, seq), got {tuple(loss_mask.shape)}")
        device = loss_mask.device
        tokens_per_row = (loss_mask != 0).sum(dim=1).to(torch.float64)
    else:
        if isinstance(seq_length, bool) or not isinstance(seq_length, int | np.integer) or seq_length < 0:
            raise ValueError(f"seq_length must be an integer >= 0, got {seq_length!r}")
        if domain_ids.dim() != 1:
            raise ValueError(f"domain_ids must have shape (batch,), got {tuple(domain_ids.shape)}")
        device = domain_ids.device
        tokens_per_row = torch.full((domain_ids.shape[0],), float(seq_length), dtype=torch.float64, device=device)
    domain_ids = check_domain_ids(domain_ids.to(device), tokens_per_row.shape[0], num_domains)
    counts = torch.zeros(num_domains, dtype=torch.float64, device=device)
    return counts.index_add_(0, domain_ids, tokens_per_row)


def excess_loss_stats(proxy_losses: torch.Tensor, reference_losses, domain_ids, num_domains: int,
                      loss_mask=None, check_range: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain (sums, counts) of the clipped excess loss ``max(proxy - ref, 0)`` of one micro-batch.

    ``proxy_losses`` and ``reference_losses`` are per-token losses (batch, seq), ``domain_ids`` (batch,).
    Each token is clipped at 0 *before* it is summed into its domain; tokens with ``loss_mask == 0`` (padding,
    ignored targets) count neither in the sums nor in the counts (a NaN there is ignored too). Returns two
    float64 tensors (k,) on ``proxy_losses``' device, detached from the graph. ``check_range=False``: the ids
    are known to lie in [0, num_domains) (checked by the data layer), so they are not read on the host.
    """
    num_domains = _check_num_domains(num_domains)
    if not isinstance(proxy_losses, torch.Tensor) or proxy_losses.dim() != 2:
        raise ValueError("proxy_losses must be a tensor of shape (batch, seq), got "
                         f"{tuple(getattr(proxy_losses, 'shape', ()))}")
    device, shape = proxy_losses.device, tuple(proxy_losses.shape)
    # Reference losses may come from a memory-mapped store on the host: bring them to the proxy's device.
    reference_losses = torch.as_tensor(reference_losses, device=device)
    if tuple(reference_losses.shape) != shape:
        raise ValueError(f"reference_losses must have the proxy losses' shape {shape}, got "
                         f"{tuple(reference_losses.shape)}")
    domain_ids = check_domain_ids(torch.as_tensor(domain_ids, device=device), shape[0], num_domains, check_range)
    keep = _token_mask(loss_mask, shape, device)

    excess = (proxy_losses.detach().to(torch.float64) - reference_losses.detach().to(torch.float64)).clamp_min(0)
    if keep is None:
        tokens_per_row = torch.full((shape[0],), float(shape[1]), dtype=torch.float64, device=device)
    else:
        excess = torch.where(keep, excess, torch.zeros((), dtype=torch.float64, device=device))
        tokens_per_row = keep.sum(dim=1).to(torch.float64)
    sums = torch.zeros(num_domains, dtype=torch.float64, device=device).index_add_(0, domain_ids, excess.sum(1))
    counts = torch.zeros(num_domains, dtype=torch.float64, device=device).index_add_(0, domain_ids,
                                                                                     tokens_per_row)
    return sums, counts


def domain_excess_loss(sums, counts, previous):
    """lambda_t: ``sums / counts`` for domains with counts > 0; a domain absent from the global batch keeps
    its ``previous`` lambda. All three are (k,); returns float64 of ``previous``' kind (tensor or numpy)."""
    total = to_float64_numpy(sums, "sums")
    num_tokens = to_float64_numpy(counts, "counts")
    last = to_float64_numpy(previous, "previous")
    if not total.shape == num_tokens.shape == last.shape:
        raise ValueError(f"sums, counts and previous must have one entry per domain, got lengths {total.size}, "
                         f"{num_tokens.size} and {last.size}")
    for array, name in ((total, "sums"), (num_tokens, "counts"), (last, "previous")):
        check_finite(array, name)
    if (num_tokens < 0).any():
        raise ValueError(f"counts must be >= 0, got {num_tokens.tolist()}")
    present = num_tokens > 0
    lam = np.where(present, total / np.where(present, num_tokens, 1.0), last)
    return like_input(lam, previous)


def initial_excess_loss(num_domains: int, vocab_size: int) -> np.ndarray:
    """lambda_0 = log(vocab_size) for every domain (k,) float64: a uniform model's per-token loss."""
    num_domains = _check_num_domains(num_domains)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int | np.integer) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
    return np.full(num_domains, math.log(vocab_size), dtype=np.float64)
