"""DoReMi: Group DRO domain weights for a proxy model.

Pure math, in the order a proxy step uses it:
  stats.py      per-micro-batch (sums, counts) of the clipped per-token excess loss, lambda_t (the sums are
                accumulated and all-reduced by ``megadoremi.distributed.stats.DomainStats``).
  weights.py    the exponentiated-gradient step with smoothing; alpha_bar.
  objective.py  the alpha-weighted proxy loss (``paper`` / ``official``), optionally normalised by the global
                per-domain token counts so that any split into micro-batches and ranks trains identically.
  state.py      DROState: alpha_t, running sum for alpha_bar, lambda_t, step; JSON (de)serialisation.
The training-time pieces, built from explicit arguments (never from a trainer):
  proxy.py      ``DoReMiObjective``: the loss objective the training loop calls for a proxy run.
  reference.py  reference losses: a frozen model run forward (live) or a memory-mapped cache.

Order within an optimizer step (``doremi.order``): alpha is fixed during a step. With one micro-batch per step,
``same_step`` follows the paper's Algorithm 1: forward (proxy and reference), reduce stats, ``DROState.update``,
loss with the new alpha_t, backward. With several micro-batches (``lagged``) the losses of step t use
alpha_{t-1}, and lambda_t is computed from the whole global batch (after the reduction) at the end of step t. Every rank calls ``update`` on the same reduced numbers, so all
ranks hold the same alpha_t without a broadcast.
"""

from megadoremi.doremi.objective import OBJECTIVES, official_token_weights, proxy_loss
from megadoremi.doremi.state import DROState
from megadoremi.doremi.stats import count_domain_tokens, domain_excess_loss, excess_loss_stats, initial_excess_loss
from megadoremi.doremi.weights import average_weights, max_weight_change, update_domain_weights

__all__ = [
    "OBJECTIVES",
    "DROState",
    "average_weights",
    "count_domain_tokens",
    "domain_excess_loss",
    "excess_loss_stats",
    "initial_excess_loss",
    "max_weight_change",
    "official_token_weights",
    "proxy_loss",
    "update_domain_weights",
]
