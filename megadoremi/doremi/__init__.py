"""DoReMi: Group DRO domain weights for a proxy model (pure math here; the trainer wires it in).

Pieces, in the order a proxy step uses them:
  stats.py      per-micro-batch (sums, counts) of the clipped per-token excess loss, their accumulation over
                the step, the SUM all-reduce over a passed group (and across pipeline stages), lambda_t.
  weights.py    the exponentiated-gradient step with smoothing; alpha_bar.
  objective.py  the alpha-weighted proxy loss (``paper`` / ``official``), optionally normalised by the global
                per-domain token counts so that any split into micro-batches and ranks trains identically.
  state.py      DROState: alpha_t, running sum for alpha_bar, lambda_t, step; JSON (de)serialisation.

Order within an optimizer step: alpha is fixed during a step. With one micro-batch per step the paper's order
is forward (proxy and reference), reduce stats, ``DROState.update``, loss with the new alpha_t, backward. With
several micro-batches the losses of step t use alpha_{t-1}, and lambda_t is computed from the whole global
batch (after ``reduce``) at the end of step t. Every rank calls ``update`` on the same reduced numbers, so all
ranks hold the same alpha_t without a broadcast.
"""

from megadoremi.doremi.objective import OBJECTIVES, official_token_weights, proxy_loss
from megadoremi.doremi.state import DROState
from megadoremi.doremi.stats import (
    DomainExcessAccumulator,
    all_reduce_sum,
    count_domain_tokens,
    domain_excess_loss,
    excess_loss_stats,
    initial_excess_loss,
    reduce_from_last_stage,
)
from megadoremi.doremi.weights import average_weights, max_weight_change, update_domain_weights

__all__ = [
    "OBJECTIVES",
    "DROState",
    "DomainExcessAccumulator",
    "all_reduce_sum",
    "average_weights",
    "count_domain_tokens",
    "domain_excess_loss",
    "excess_loss_stats",
    "initial_excess_loss",
    "max_weight_change",
    "official_token_weights",
    "proxy_loss",
    "reduce_from_last_stage",
    "update_domain_weights",
]
