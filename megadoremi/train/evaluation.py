"""Per-domain validation: every rank evaluates its share of each domain's validation samples; the per-domain loss
sums and token counts are all-reduced (``DomainStats``) and divided once. Each domain's standard error comes from
its samples' mean losses (the spread of the validation samples, not of training)."""

import math

import torch

from megadoremi.data.batches import eval_micro_batches
from megadoremi.distributed.engine import TrainingEngine
from megadoremi.distributed.stats import DomainStats
from megadoremi.model.gpt import token_losses
from megadoremi.train.objective import PipelineLoss, pipeline_items


class ValidationStats:
    """Per-domain loss sums and token counts, and per-domain sums of each sample's mean loss squared."""

    def __init__(self, num_domains: int, device):
        self.losses, self.squares = DomainStats(num_domains, device), DomainStats(num_domains, device)

    def add(self, losses: torch.Tensor, domain_ids: torch.Tensor) -> None:
        """losses (batch, seq), domain_ids (batch,)."""
        self.losses.add(losses, domain_ids)
        sample_means = losses.detach().double().mean(dim=1, keepdim=True)  # (batch, 1)
        self.squares.add(sample_means * sample_means, domain_ids)


def standard_errors(losses: DomainStats, squares: DomainStats, names: list[str]) -> dict[str, float]:
    """Standard error of each domain's mean loss over its validation samples (std of the samples' mean losses /
    sqrt(samples)); domains with fewer than two samples are left out."""
    errors = {}
    for d, name in enumerate(names):
        count = float(losses.samples[d])
        if count < 2:
            continue
        mean = float(losses.sums[d]) / float(losses.tokens[d])
        variance = max(float(squares.sums[d]) / count - mean * mean, 0.0) * count / (count - 1)
        errors[name] = math.sqrt(variance / count)
    return errors


@torch.no_grad()
def evaluate_domains(trained: TrainingEngine, eval_datasets: dict, domain_names: list[str], plan, max_samples: int,
             batch_size: int | None, device, pipeline_loss: PipelineLoss | None, step: int) -> dict:
    """The eval.jsonl record of ``step``: per-domain ``val_loss`` and ``val_ppl``, their average and worst.

    Collective: every rank calls it. ``batch_size`` None: the micro batch (always so with pipeline stages,
    whose engine needs fixed micro-batch shapes); ``pipeline_loss`` is the engine's loss function (pipeline
    stages only), switched to evaluation meanwhile.
    """
    engine = trained.engine
    engine.eval()
    stats = ValidationStats(len(domain_names), device)
    pipeline = trained.pipeline_parallel
    multiple = plan.grad_accum if pipeline else 1
    for domain_id, name in enumerate(domain_names):
        dataset = eval_datasets.get(name)
        if dataset is None:
            continue
        batches = eval_micro_batches(dataset, domain_id, plan, trained.data_parallel_rank, max_samples, multiple,
                                     batch_size=None if pipeline else batch_size or plan.micro_batch_size)
        if pipeline:
            pipeline_loss.evaluate(stats)
            for start in range(0, len(batches), multiple):
                engine.eval_batch(iter(list(pipeline_items(batches[start:start + multiple]))))
        else:
            for batch in batches:
                tokens = batch["tokens"].to(device)
                losses = token_losses(engine(tokens[:, :-1]), tokens[:, 1:])  # (batch, seq)
                if not batch.get("padding"):
                    stats.add(losses, batch["domain_ids"])
    group = None if pipeline else trained.data_parallel_group
    reduced = stats.losses.reduced(group, contributes=trained.is_last_stage)
    squares = stats.squares.reduced(group, contributes=trained.is_last_stage)
    engine.train()
    per_domain = reduced.domain_means(domain_names)
    errors = standard_errors(reduced, squares, domain_names)
    record = {"step": step, "val_loss": per_domain,
              "val_ppl": {name: math.exp(min(loss, 50.0)) for name, loss in per_domain.items()},
              "val_loss_se": errors}
    if per_domain:
        record["val_loss_avg"] = sum(per_domain.values()) / len(per_domain)
        record["val_loss_worst"] = max(per_domain.values())
        if len(errors) == len(per_domain):  # the domains' samples are independent
            record["val_loss_avg_se"] = math.sqrt(sum(e * e for e in errors.values())) / len(errors)
    return record
