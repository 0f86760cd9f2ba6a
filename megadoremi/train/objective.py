"""The loss-objective seam of the training loop, the plain language-modelling objective, and the pipeline
engine's loss function that routes the last stage's losses to the objective.

The loop computes per-token losses (batch, seq) in fp32 for every micro-batch, adds them to the per-domain
statistics, and asks the objective for the scalar to backpropagate. An objective implements:

    name: str                                   stored with its state in checkpoints
    log_name: str | None                        a per-step JSONL file in the run directory (or None)
    begin_step(micro_batches) -> None           once per optimizer step, before the first forward; may attach
                                                tensors to the micro-batch dicts (e.g. reference losses)
    loss(token_losses, batch) -> scalar tensor  per micro-batch (on the last stage with pipeline stages)
    step_stats: list[DomainStats]               statistics the loop all-reduces together with its own at the end
                                                of the step (one collective, one host copy for all)
    end_step(*reduced) -> dict                  after the step's last backward, with ``step_stats`` reduced, in
                                                order: metrics for metrics.jsonl
    log_record() -> dict                        the line for ``log_name`` (when it is set)
    state_dict() -> dict / load_state_dict(dict)   JSON-serialisable, in every checkpoint
    finish(run_dir, write) -> dict              at the end of a completed run: outputs, summary entries

Objectives are built from explicit arguments (``megadoremi.train.build.build_objective``) and never see the
trainer. ``megadoremi.doremi.proxy.DoReMiObjective`` is the Group-DRO proxy.
"""

import torch

from megadoremi.model.gpt import token_losses


class LanguageModelingObjective:
    """The mean token cross-entropy of each micro-batch (DeepSpeed averages over micro-batches and ranks)."""

    name = "lm"
    log_name = None
    step_stats = ()

    def begin_step(self, micro_batches: list[dict]) -> None:
        pass

    def loss(self, token_losses: torch.Tensor, batch: dict) -> torch.Tensor:
        return token_losses.mean()

    def end_step(self) -> dict:
        return {}

    def log_record(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finish(self, run_dir: str, write: bool) -> dict:
        return {}


class PipelineLoss:
    """The ``loss_fn`` of DeepSpeed's pipeline engine, called on the last stage once per micro-batch, in order.

    Labels are ``(targets (batch, seq), domain_ids (batch,))``. Training (``train``): the per-token losses go to
    the step's statistics and the objective gives the loss, with the micro-batch dict the loop read (the
    schedule runs the forwards of a step's micro-batches in order). Evaluation (``evaluate``): statistics only.
    """

    def __init__(self):
        self.stats, self.objective, self._batches = None, None, None

    def train(self, stats, objective, micro_batches: list[dict]) -> None:
        self.stats, self.objective, self._batches = stats, objective, iter(micro_batches)

    def evaluate(self, stats) -> None:
        self.stats, self.objective, self._batches = stats, None, None

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        targets, domain_ids = labels
        losses = token_losses(logits, targets)  # (batch, seq) fp32
        self.stats.add(losses, domain_ids)
        if self.objective is None:
            return losses.mean()
        return self.objective.loss(losses, next(self._batches))


def pipeline_items(micro_batches: list[dict]):
    """What the pipeline engine's data iterator yields: (inputs (batch, seq), (targets, domain_ids))."""
    for batch in micro_batches:
        tokens = batch["tokens"]
        yield tokens[:, :-1].contiguous(), (tokens[:, 1:].contiguous(), batch["domain_ids"])
