"""The DoReMi proxy inside the trainer: alpha-weighted loss, global excess-loss statistics, alpha updates,
DRO state in checkpoints, and the outputs a user looks at.

Per optimizer step (alpha is fixed during a step):
- ``order=paper`` (one micro-batch per step, no pipeline): forward the proxy and the reference, all-reduce the
  per-domain excess sums and token counts over the data-parallel group, update alpha, loss with the new
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

from megadoremi.doremi.objective import proxy_loss
from megadoremi.doremi.reference import (
    CachedReference,
    LiveReference,
    file_md5,
    reference_model_path,
    stream_identity,
)
from megadoremi.doremi.state import DROState
from megadoremi.doremi.stats import DomainExcessAccumulator, count_domain_tokens, reduce_from_last_stage
from megadoremi.model.gpt import token_losses
from megadoremi.utils.fs import atomic_output
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

TRAJECTORY_FILE = "doremi_trajectory.jsonl"
WEIGHTS_FILE = "domain_weights.json"


class DROHook:
    """Owned by the Trainer when ``doremi.enabled``; the trainer calls it for steps, checkpoints and outputs."""

    def __init__(self, trainer):
        from megadoremi.data.blending import load_domain_weights

        self.trainer = trainer
        config = trainer.config.doremi
        self.config = config
        self.domain_names = trainer.domain_names
        num_domains = len(self.domain_names)
        initial = None
        if config.initial_weights is not None:
            initial = load_domain_weights(config.initial_weights, self.domain_names)
        self.state = DROState.initial(self.domain_names, trainer.model_config.vocab_size, initial_weights=initial,
                                      step_size=config.step_size, smoothing=config.smoothing)
        self.order = config.order
        if self.order == "auto":
            single = trainer.plan.grad_accum == 1 and not trainer.pipeline
            self.order = "paper" if single else "lagged"
        self.sampling_weights = list(trainer.domain_weights)
        self.excess = DomainExcessAccumulator(num_domains, trainer.device)
        self.token_counts = None
        self._build_reference()
        logger.info("DoReMi proxy: objective %s, order %s, step size %g, smoothing %g, reference %s",
                    config.objective, self.order, config.step_size, config.smoothing,
                    "cached losses " + config.reference_losses if config.reference_losses
                    else "model " + str(config.reference_model))

    def _build_reference(self) -> None:
        trainer, config = self.trainer, self.config
        reference_md5 = None
        if config.reference_model:
            path = reference_model_path(config.reference_model)
            if not os.path.exists(path):
                raise FileNotFoundError(f"doremi.reference_model: {path} not found (a finished reference run "
                                        "writes RUN_DIR/model.pt)")
            reference_md5 = file_md5(path)
        if config.reference_losses:
            identity = stream_identity(trainer.config, trainer.plan.global_batch_size)
            self.reference = CachedReference(config.reference_losses, identity, reference_md5)
            return
        if trainer.pipeline and not trainer.engine.is_last_stage():
            self.reference = None  # only the last stage computes losses
            return
        zero3 = trainer.ds_config if trainer.config.parallel.zero_stage == 3 else None
        dtype = torch.bfloat16 if trainer.ds_config["bf16"]["enabled"] else torch.float32
        self.reference = LiveReference(config.reference_model, trainer.model_config, trainer.device, dtype, zero3)

    # --- one optimizer step ------------------------------------------------------------------------------

    def _global_token_counts(self, micro_batches: list[dict]) -> torch.Tensor:
        seq_length = micro_batches[0]["tokens"].shape[1] - 1
        counts = sum(count_domain_tokens(batch["domain_ids"], len(self.domain_names), seq_length=seq_length)
                     for batch in micro_batches).to(self.trainer.device)
        if dist.is_initialized():
            dist.all_reduce(counts, group=self.trainer.dp_group)
        return counts

    def _loss(self, losses: torch.Tensor, domain_ids: torch.Tensor, alpha) -> torch.Tensor:
        plan = self.trainer.plan
        return proxy_loss(losses, domain_ids.to(losses.device), alpha, self.config.objective,
                          sampling_weights=self.sampling_weights, domain_token_counts=self.token_counts,
                          num_micro_batches=plan.grad_accum, dp_size=plan.data_parallel_size)

    def _reduce_and_update(self) -> None:
        if self.trainer.pipeline:
            sums, counts = reduce_from_last_stage(self.excess.sums, self.excess.counts,
                                                  self.trainer.engine.is_last_stage())
        else:
            sums, counts = self.excess.reduce(self.trainer.dp_group)
        self.state.update(sums, counts)
        if self.config.check_consistency and dist.is_initialized():
            self._check_consistency()

    def _check_consistency(self) -> None:
        mine = torch.tensor(self.state.weights, dtype=torch.float64, device=self.trainer.device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, mine):
                raise RuntimeError(f"DoReMi: rank {rank} holds different domain weights at step {self.state.step}")

    def train_step(self, micro_batches: list[dict]) -> None:
        """A proxy step without pipeline stages."""
        trainer = self.trainer
        engine, stats = trainer.engine, trainer.loss_stats
        self.excess.reset()
        self.token_counts = self._global_token_counts(micro_batches)
        if self.order == "paper":
            (batch,) = micro_batches
            tokens = batch["tokens"].to(trainer.device)
            losses = token_losses(engine(tokens[:, :-1]), tokens[:, 1:])  # (batch, seq)
            self.excess.add(losses.detach(), self.reference.losses(batch), batch["domain_ids"])
            self._reduce_and_update()
            engine.backward(self._loss(losses, batch["domain_ids"], self.state.weights))
            engine.step()
            stats.add(losses, batch["domain_ids"])
            return
        alpha = self.state.weights.copy()
        for batch in micro_batches:
            tokens = batch["tokens"].to(trainer.device)
            losses = token_losses(engine(tokens[:, :-1]), tokens[:, 1:])
            self.excess.add(losses.detach(), self.reference.losses(batch), batch["domain_ids"])
            engine.backward(self._loss(losses, batch["domain_ids"], alpha))
            engine.step()
            stats.add(losses, batch["domain_ids"])
        self._reduce_and_update()

    # --- pipeline form: the loss runs on the last stage -------------------------------------------------

    def pipeline_items(self, micro_batches: list[dict]):
        """(inputs, (targets, domain_ids, reference losses)) per micro-batch; references on the last stage."""
        for batch in micro_batches:
            tokens = batch["tokens"]
            if self.reference is not None:
                reference = self.reference.losses(batch)
            else:
                reference = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
            yield tokens[:, :-1].contiguous(), (tokens[:, 1:].contiguous(), batch["domain_ids"], reference)

    def pipeline_loss(self, logits: torch.Tensor, labels) -> torch.Tensor:
        """Loss of one training micro-batch on the last stage, with the step's fixed alpha."""
        targets, domain_ids, reference = labels
        losses = token_losses(logits, targets)
        self.trainer.loss_stats.add(losses, domain_ids)
        self.excess.add(losses.detach(), reference, domain_ids)
        return self._loss(losses, domain_ids, self._step_alpha)

    def pipeline_train_step(self, micro_batches: list[dict]) -> None:
        self.excess.reset()
        self.token_counts = self._global_token_counts(micro_batches)
        self._step_alpha = self.state.weights.copy()
        self.trainer.engine.train_batch(data_iter=self.pipeline_items(micro_batches))
        self._reduce_and_update()

    # --- state, metrics and outputs ----------------------------------------------------------------------

    def metrics(self) -> dict:
        record = self.state.trajectory_record()
        return {"domain_weights": record["weights"], "excess_loss": record["excess_loss"]}

    def append_trajectory(self) -> None:
        if self.trainer.rank == 0:
            with open(os.path.join(self.trainer.run_dir, TRAJECTORY_FILE), "a") as handle:
                handle.write(json.dumps(self.state.trajectory_record()) + "\n")

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state = DROState.from_dict(state, self.domain_names)

    def write_outputs(self) -> dict:
        """domain_weights.json (alpha_bar), the Megatron --data-path line, and a plot (rank 0)."""
        trainer = self.trainer
        average = {name: float(w) for name, w in zip(self.domain_names, self.state.average_weights)}
        if trainer.rank != 0:
            return average
        run_dir = trainer.run_dir
        with atomic_output(os.path.join(run_dir, WEIGHTS_FILE), "w") as handle:
            json.dump(average, handle, indent=1)
        prefixes = trainer.config.data.domains
        data_path = " ".join(f"{average[name]:.6g} {prefixes[name]}" for name in self.domain_names)
        with atomic_output(os.path.join(run_dir, "data_path.txt"), "w") as handle:
            handle.write(data_path + "\n")
        try:
            from megadoremi.doremi.plot import plot_trajectory

            plot_trajectory(os.path.join(run_dir, TRAJECTORY_FILE), os.path.join(run_dir, "doremi_weights.png"))
        except ImportError as error:
            logger.warning("no plot (%s); the trajectory is in %s", error, TRAJECTORY_FILE)
        logger.info("DoReMi weights (average over %d steps): %s", self.state.step,
                    " ".join(f"{name} {weight:.4f}" for name, weight in average.items()))
        logger.info("Megatron --data-path %s", data_path)
        return average
