"""The proxy model's training loss under Group DRO: domain losses weighted by the (detached) weights alpha.

Two objectives (``objective=``), which agree only in expectation:

``paper`` (DoReMi Eq. 1, the default): ``L = sum_d alpha_d * (1 / N_d) * sum_{j in T_d} l_j`` over the domains
present, where T_d is the set of counted tokens of domain d in the batch (``loss_mask != 0``), N_d = |T_d| and
l_j the proxy's per-token loss. The reference loss is constant in the parameters, so it is left out: the value
differs from the paper's excess-loss objective by a constant, the gradient is the same.

``official`` (the official repository's token-weighted form): ``L = sum_j w_{d(j)} l_j / sum_j w_{d(j)}`` over
all counted tokens, with ``w_d = (alpha_d / p_d) / sum_i (alpha_i / p_i)`` and p the sampling mixture.

Composition with gradient accumulation and data parallelism
-----------------------------------------------------------
The objective above is defined on the *global* batch G (all A micro-batches of the step on each of the D
data-parallel ranks). DeepSpeed never sees G at once: it calls backward on each micro-batch loss divided by A
(``gradient_accumulation_steps``, the pipeline engine does the same) and averages gradients over the D ranks,
so what it optimises is ``(1 / (A * D)) * sum_{r, m} L_{r, m}`` where L_{r, m} is the loss of micro-batch m on
rank r. A per-domain mean taken inside each micro-batch is a mean of means: it weights a domain's tokens by
how they happen to fall into micro-batches, and a domain missing from one micro-batch is silently dropped
there, so 2 ranks x b, 1 rank x 2b and 1 rank x 2 accumulation steps of b would all train differently.

Pass ``domain_token_counts`` = N (k,), the per-domain counted-token totals of the whole global batch (sum
``count_domain_tokens`` over the rank's micro-batches of the step and all-reduce with SUM over the data-parallel
group; it needs only the data, so it can be done before the step's first forward), together with
``num_micro_batches`` = A and ``dp_size`` = D. Each micro-batch then returns

    paper:     L_{r,m} = A * D * sum_d alpha_d * (sum_{j in T_d and B_{r,m}} l_j) / N_d
    official:  L_{r,m} = A * D * (sum_{j in B_{r,m}} w_{d(j)} l_j) / W,   W = sum_d w_d * N_d

Both are linear in the token losses, and the sets (T_d and B_{r,m}) over all r, m partition T_d. Hence
``(1 / (A * D)) * sum_{r, m} L_{r, m}`` equals the single-batch objective on G exactly, in value and, because
alpha, w, N and W are constants, in gradient, for any split of G into micro-batches and ranks (even unequal
ones). This is the same normalisation the official code gets by all-reducing its normaliser, extended to
gradient accumulation. Without ``domain_token_counts`` each call normalises by its own micro-batch (correct
for one micro-batch on one rank; otherwise only approximately the paper's objective).
"""

import numpy as np
import torch

from megadoremi.doremi.stats import check_domain_ids, count_domain_tokens
from megadoremi.doremi.weights import check_finite, to_float64_numpy

OBJECTIVES = ("paper", "official")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _nonnegative_vector(values, num_domains: int, name: str) -> np.ndarray:
    array = to_float64_numpy(values, name)
    if array.size != num_domains:
        raise ValueError(f"{name} must have one entry per domain ({num_domains}), got length {array.size}")
    check_finite(array, name)
    if (array < 0).any():
        raise ValueError(f"{name} must be >= 0, got {array.tolist()}")
    return array


def official_token_weights(alpha, sampling_weights) -> np.ndarray:
    """``w_d = (alpha_d / p_d) / sum_i (alpha_i / p_i)`` (k,) float64; every p_d must be > 0."""
    alpha = to_float64_numpy(alpha, "alpha")
    p = _nonnegative_vector(sampling_weights, alpha.size, "sampling_weights")
    if (p <= 0).any():
        raise ValueError(f"sampling_weights must be > 0 for every domain, got {p.tolist()}")
    ratio = alpha / p
    total = ratio.sum()
    if total <= 0:
        raise ValueError(f"alpha must have a positive entry, got {alpha.tolist()}")
    return ratio / total


def proxy_loss(token_losses: torch.Tensor, domain_ids, alpha, objective: str = "paper", sampling_weights=None,
               loss_mask=None, domain_token_counts=None, num_micro_batches: int = 1, dp_size: int = 1,
               local_token_counts=None) -> torch.Tensor:
    """Scalar DRO loss of one micro-batch: token_losses (batch, seq) with grad, domain_ids (batch,), alpha (k,).

    ``alpha`` is treated as a constant (any gradient it carries is dropped). ``objective`` is ``paper`` or
    ``official`` (which needs ``sampling_weights``, the mixture p the batches are drawn from). Tokens with
    ``loss_mask == 0`` do not count. With ``domain_token_counts`` (global per-domain token counts of the step,
    already all-reduced), ``num_micro_batches`` (gradient accumulation steps A) and ``dp_size`` (D), the
    per-micro-batch losses averaged as DeepSpeed does (1 / (A * D)) give exactly the objective of the whole
    global batch; see the module docstring. ``local_token_counts`` (k,): this micro-batch's counted tokens per
    domain, when the caller has them on the host (the training step counts them from the data, whose domain ids
    are already checked); then nothing here reads a device tensor on the host. Returns a 0-dim tensor of
    token_losses' dtype and device.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not isinstance(token_losses, torch.Tensor) or token_losses.dim() != 2:
        raise ValueError("token_losses must be a tensor of shape (batch, seq), got "
                         f"{tuple(getattr(token_losses, 'shape', ()))}")
    num_micro_batches = _positive_int(num_micro_batches, "num_micro_batches")
    dp_size = _positive_int(dp_size, "dp_size")
    alpha = to_float64_numpy(alpha, "alpha")
    num_domains = alpha.size
    if num_domains < 1:
        raise ValueError("alpha must have at least one domain, got an empty vector")
    alpha = _nonnegative_vector(alpha, num_domains, "alpha")
    device, shape = token_losses.device, tuple(token_losses.shape)
    domain_ids = check_domain_ids(torch.as_tensor(domain_ids, device=device), shape[0], num_domains,
                                  check_range=local_token_counts is None)
    if loss_mask is not None:
        loss_mask = torch.as_tensor(loss_mask, device=device)
        if tuple(loss_mask.shape) != shape:
            raise ValueError(f"loss_mask must have token_losses' shape {shape}, got {tuple(loss_mask.shape)}")
    if local_token_counts is not None:
        if loss_mask is not None:
            raise ValueError("give local_token_counts or loss_mask, not both (the counts would ignore the mask)")
        local_counts = _nonnegative_vector(local_token_counts, num_domains, "local_token_counts")
    else:
        local_counts = count_domain_tokens(domain_ids, num_domains, loss_mask=loss_mask,
                                           seq_length=None if loss_mask is not None else shape[1]).cpu().numpy()

    if domain_token_counts is None:
        if num_micro_batches != 1 or dp_size != 1:
            raise ValueError("num_micro_batches and dp_size only apply with domain_token_counts (the global "
                             "per-domain token counts of the step)")
        counts, scale = local_counts, 1.0
    else:
        counts = _nonnegative_vector(domain_token_counts, num_domains, "domain_token_counts")
        short = np.flatnonzero(local_counts > counts)
        if short.size:
            raise ValueError(f"domain_token_counts must be the global counts of the step (all micro-batches, "
                             f"all ranks), but domains {short.tolist()} have fewer ({counts[short].tolist()}) "
                             f"than this micro-batch alone ({local_counts[short].tolist()})")
        scale = float(num_micro_batches * dp_size)

    # Per-domain coefficient c_d so that the loss is sum_j c_{d(j)} * l_j: a constant k-vector in float64.
    present = counts > 0
    if objective == "paper":
        coefficient = np.where(present, alpha / np.where(present, counts, 1.0), 0.0)
    else:
        if sampling_weights is None:
            raise ValueError("objective 'official' needs sampling_weights (the mixture p batches are drawn from)")
        token_weights = official_token_weights(alpha, sampling_weights)
        normalizer = float((token_weights * counts).sum())  # W = sum_j w_{d(j)} over the counted tokens
        coefficient = token_weights / normalizer if normalizer > 0 else np.zeros(num_domains)
    coefficient = torch.from_numpy(coefficient * scale).to(device=device, dtype=token_losses.dtype)

    row_coefficient = coefficient[domain_ids]  # (batch,)
    losses = token_losses if loss_mask is None else \
        torch.where(loss_mask != 0, token_losses, torch.zeros((), dtype=token_losses.dtype, device=device))
    return (losses * row_coefficient[:, None]).sum()
