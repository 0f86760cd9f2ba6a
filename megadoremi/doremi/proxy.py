"""The DoReMi proxy as a loss objective of the training loop: alpha-weighted domain losses, global excess-loss
statistics, the DRO update of alpha, its state in checkpoints, and the outputs a user looks at.

``DoReMiObjective`` is built from explicit arguments (the DoReMi config, the domains, the vocabulary size, the
sampling mixture, the reference, the batch plan and the data-parallel group), never from a trainer, and the loop
calls it through the objective seam: ``begin_step(micro_batches)`` once per optimizer step, ``loss(token_losses,
batch)`` for every micro-batch (on the last pipeline stage with pipeline stages), ``end_step(*reduced step_stats)`` at the end of the
step, ``state_dict()`` / ``load_state_dict()`` for checkpoints, ``finish()`` at the end of a completed run.

Per optimizer step (alpha is fixed during a step):
- ``order=same_step`` (one micro-batch per step, no pipeline): forward the proxy and the reference, all-reduce
  the per-domain excess sums and token counts over the data-parallel group, update alpha, loss with the new
  alpha_t, backward (the paper's Algorithm 1).
- ``order=lagged`` (any layout): every micro-batch's loss uses alpha_{t-1}; the statistics of the whole global
  batch are reduced at the end of the step and give alpha_t.
Losses are normalised by the global per-domain token counts of the step, so any split of the global batch into
ranks and micro-batches trains identically (see ``megadoremi.doremi.objective``). Every rank updates alpha from
the same reduced numbers: no broadcast, never a stale alpha.
"""

import json
import os

import torch
import torch.distributed as dist

from megadoremi.data.blending import load_domain_weights
from megadoremi.distributed.stats import DomainStats
from megadoremi.doremi.objective import proxy_loss
from megadoremi.doremi.state import DROState
from megadoremi.doremi.stats import excess_loss_stats
from megadoremi.utils.fs import atomic_output
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

TRAJECTORY_FILE = "doremi_trajectory.jsonl"
WEIGHTS_FILE = "domain_weights.json"
DATA_PATH_FILE = "data_path.txt"


def resolve_order(order: str, plan) -> str:
    """``auto`` -> ``same_step`` with one micro-batch per step and no pipeline stages, else ``lagged``."""
    if order != "auto":
        return order
    return "same_step" if plan.grad_accum == 1 and plan.pipeline_stages == 1 else "lagged"


class DoReMiObjective:
    """Group-DRO proxy loss and alpha updates (see the module docstring)."""

    name = "doremi"
    log_name = TRAJECTORY_FILE  # one line per step: alpha_t and lambda_t

    def __init__(self, config, domain_names, vocab_size: int, sampling_weights, reference, plan, *,
                 data_parallel_group=None, is_last_stage: bool = True, device="cpu", data_prefixes=None):
        """``config``: a DoReMiConfig; ``sampling_weights`` (k,): the mixture batches are drawn from;
        ``reference``: an object with ``losses(batch) -> (batch, seq)`` (None where no loss is computed);
        ``plan``: the BatchPlan; ``data_parallel_group``: the group to reduce over (None: the world; with
        pipeline stages the reduction is world-wide, with the stages before the last contributing zeros);
        ``data_prefixes``: {domain: dataset prefix} for the Megatron ``--data-path`` line."""
        self.config = config
        self.domain_names = list(domain_names)
        initial = None
        if config.initial_weights is not None:
            initial = load_domain_weights(config.initial_weights, self.domain_names)
        self.state = DROState.initial(self.domain_names, vocab_size, initial_weights=initial,
                                      step_size=config.step_size, smoothing=config.smoothing)
        self.order = resolve_order(config.order, plan)
        if self.order == "same_step" and (plan.grad_accum > 1 or plan.pipeline_stages > 1):
            raise ValueError("doremi.order=same_step needs one micro-batch per step and no pipeline stages")
        self.plan = plan
        self.sampling_weights = [float(w) for w in sampling_weights]
        self.reference = reference
        self.pipeline_parallel = plan.pipeline_stages > 1
        self.group = None if self.pipeline_parallel else data_parallel_group
        self.is_last_stage = is_last_stage
        self.device = torch.device(device)
        self.data_prefixes = data_prefixes
        self.excess = DomainStats(len(self.domain_names), self.device)
        self.token_counts = None
        self.seq_length = None
        self.step_alpha = None
        logger.info("DoReMi proxy: objective %s, order %s, step size %g, smoothing %g, reference %s",
                    config.objective, self.order, config.step_size, config.smoothing,
                    "cached losses " + config.reference_losses if config.reference_losses
                    else "model " + str(config.reference_model))

    # --- one optimizer step --------------------------------------------------------------------------------

    @property
    def step_stats(self) -> list[DomainStats]:
        """The excess-loss statistics the loop reduces with its own at the end of the step (order lagged; one
        all-reduce and one host copy for both); none with order same_step, which reduces them in ``loss``."""
        return [self.excess] if self.order == "lagged" else []

    def begin_step(self, micro_batches: list[dict]) -> None:
        """Global per-domain token counts of the step (from the data: every rank knows the global batch's
        domains); reference losses for every micro-batch."""
        self.excess.reset()
        seq_length = micro_batches[0]["tokens"].shape[1] - 1
        self.seq_length = seq_length
        # (k,) float64 on the host: the global batch's samples per domain x tokens per sample (no loss mask in
        # training), the same on every rank and pipeline stage without a collective or a device transfer.
        self.token_counts = micro_batches[0]["step_domain_counts"].astype("float64") * seq_length
        self.step_alpha = self.state.weights.copy()
        if self.reference is not None:
            for batch in micro_batches:
                batch["reference_losses"] = self.reference.losses(batch)  # (batch, seq) float32

    def loss(self, token_losses: torch.Tensor, batch: dict) -> torch.Tensor:
        """The proxy loss of one micro-batch: token_losses (batch, seq) with grad. The batch's domain ids are
        checked by the data layer (``megadoremi.data.batches``), so nothing here waits for the device."""
        domain_ids = batch["domain_ids"].to(token_losses.device)
        sums, counts = excess_loss_stats(token_losses.detach(), batch["reference_losses"], domain_ids,
                                         len(self.domain_names), check_range=False)
        samples = torch.from_numpy(batch["domain_counts"])
        self.excess.add_totals(sums, counts, samples)
        if self.order == "same_step":
            self._reduce_and_update(self.excess.reduced(self.group, contributes=self.is_last_stage))
            alpha = self.state.weights
        else:
            alpha = self.step_alpha
        return proxy_loss(token_losses, domain_ids, alpha, self.config.objective,
                          sampling_weights=self.sampling_weights, domain_token_counts=self.token_counts,
                          num_micro_batches=self.plan.grad_accum, dp_size=self.plan.data_parallel_size,
                          local_token_counts=batch["domain_counts"] * self.seq_length)

    def end_step(self, reduced: DomainStats | None = None) -> dict:
        """alpha_t from ``reduced``, the step's excess-loss statistics reduced by the loop (order lagged); the
        step's metrics."""
        if self.order == "lagged":
            if reduced is None:
                raise ValueError("DoReMi (order lagged): end_step needs the reduced step_stats")
            self._reduce_and_update(reduced)
        record = self.state.trajectory_record()
        return {"doremi_alpha": record["weights"], "doremi_excess_loss": record["excess_loss"]}

    def _reduce_and_update(self, reduced: DomainStats) -> None:
        sums, tokens, _ = reduced.numpy()
        self.state.update(sums, tokens)
        if self.config.check_consistency and dist.is_initialized():
            self._check_consistency()

    def _check_consistency(self) -> None:
        mine = torch.tensor(self.state.weights, dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, mine):
                raise RuntimeError(f"DoReMi: rank {rank} holds different domain weights at step {self.state.step}")

    # --- state, logs and outputs -----------------------------------------------------------------------------

    def log_record(self) -> dict:
        """The trajectory line of the last step."""
        return self.state.trajectory_record()

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state = DROState.from_dict(state, self.domain_names)

    @property
    def average_weights(self) -> dict[str, float]:
        return {name: float(w) for name, w in zip(self.domain_names, self.state.average_weights)}

    def finish(self, run_dir: str, write: bool) -> dict:
        """At the end of a completed run: ``domain_weights.json`` (alpha_bar), the Megatron ``--data-path`` line
        and a plot, written when ``write`` (one rank). Returns ``{"domain_weights": alpha_bar}`` for the summary."""
        average = self.average_weights
        if not write:
            return {"domain_weights": average}
        with atomic_output(os.path.join(run_dir, WEIGHTS_FILE), "w") as handle:
            json.dump(average, handle, indent=1)
        if self.data_prefixes:
            data_path = " ".join(f"{average[name]:.6g} {self.data_prefixes[name]}" for name in self.domain_names)
            with atomic_output(os.path.join(run_dir, DATA_PATH_FILE), "w") as handle:
                handle.write(data_path + "\n")
            logger.info("Megatron --data-path %s", data_path)
        try:
            from megadoremi.utils.plot import plot_trajectory

            plot_trajectory(os.path.join(run_dir, TRAJECTORY_FILE), os.path.join(run_dir, "doremi_weights.png"))
        except ImportError as error:
            logger.warning("no plot (%s); the trajectory is in %s", error, TRAJECTORY_FILE)
        logger.info("DoReMi weights (average over %d steps): %s", self.state.step,
                    " ".join(f"{name} {weight:.4f}" for name, weight in average.items()))
        return {"domain_weights": average}
