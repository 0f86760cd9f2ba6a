"""Derived numbers, computed once: the batch plan and the DeepSpeed JSON built from a template.

global batch = micro batch x gradient accumulation x data-parallel size, where data-parallel size = world size /
pipeline stages. The DeepSpeed JSON gets exactly these numbers (never written by hand in two places) and is saved
in the run directory next to the resolved config.
"""

import copy
import json
import math
import os
from dataclasses import asdict, dataclass

from megadoremi.config import ConfigError, ExperimentConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class BatchPlan:
    world_size: int
    pipeline_stages: int
    data_parallel_size: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int  # samples per optimizer step
    seq_length: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_batch_plan(config: ExperimentConfig, world_size: int) -> BatchPlan:
    """Check that the processes split into pipeline stages x data-parallel replicas, and size the batch."""
    stages = config.parallel.pipeline_stages
    if world_size % stages:
        raise ConfigError(
            f"parallel.pipeline_stages={stages} does not divide the world size {world_size}: "
            f"cannot split {world_size} processes into pipeline stages"
        )
    dp = world_size // stages
    train = config.train
    if config.parallel.pipeline_stages > 1 and train.grad_accum < stages:
        # Not an error, but the pipeline would mostly idle: say so early.
        from megadoremi.utils.logging import get_logger

        get_logger(__name__).warning(
            "train.grad_accum=%d < pipeline_stages=%d: the pipeline bubble dominates; use more micro-batches",
            train.grad_accum, stages)
    return BatchPlan(world_size, stages, dp, train.micro_batch_size, train.grad_accum,
                     train.micro_batch_size * train.grad_accum * dp, train.seq_length)


def default_template_path(zero_stage: int) -> str:
    return os.path.join(REPO_ROOT, "ds_configs", f"zero{zero_stage}.json")


def load_template(config: ExperimentConfig) -> dict:
    path = config.parallel.ds_config_template or default_template_path(config.parallel.zero_stage)
    try:
        with open(path) as handle:
            template = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"parallel.ds_config_template: {path} not found") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"parallel.ds_config_template: {path} is not valid JSON: {error}") from None
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in template:
            raise ConfigError(
                f"parallel.ds_config_template: {path} sets {key}; batch sizes come from the train section only"
            )
    return template


def use_bf16(config: ExperimentConfig, cuda: bool) -> bool:
    """bf16 on GPU, fp32 on CPU, unless train.precision says otherwise."""
    return config.train.precision == "bf16" or (config.train.precision == "auto" and cuda)


def build_ds_config(config: ExperimentConfig, plan: BatchPlan, cuda: bool) -> dict:
    """The DeepSpeed JSON actually used: the template plus batch sizes, optimizer settings and precision."""
    ds = copy.deepcopy(load_template(config))
    ds.pop("_comment", None)
    train = config.train
    ds["train_batch_size"] = plan.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["gradient_clipping"] = train.grad_clip
    ds.setdefault("zero_optimization", {})["stage"] = config.parallel.zero_stage
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    optimizer.setdefault("params", {}).update(
        {"lr": train.lr, "betas": list(train.betas), "eps": train.eps, "weight_decay": train.weight_decay}
    )
    ds["bf16"] = {"enabled": use_bf16(config, cuda)}
    ds.setdefault("steps_per_print", 10**9)
    return ds


def warmup_steps(config: ExperimentConfig) -> int:
    return int(round(config.train.warmup_fraction * config.train.steps))


def lr_at(step: int, config: ExperimentConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then exponential / cosine decay."""
    train = config.train
    warmup = warmup_steps(config)
    if step < warmup:
        return train.lr * (step + 1) / warmup
    if train.decay == "constant":
        return train.lr
    progress = min(1.0, (step - warmup) / max(1, train.steps - warmup))
    if train.decay == "exponential":
        return train.lr * (train.min_lr / train.lr) ** progress
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))
