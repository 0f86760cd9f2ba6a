"""DeepSpeed engine set-up, applied to the model from outside (the model knows nothing of parallelism).

``build_ds_config`` turns a template from ``ds_configs/`` plus the batch plan and the train section into the
DeepSpeed JSON actually used; ``build_engine`` builds the GPT under ``zero.Init`` (ZeRO-3) or as a
``PipelineModule`` (pipeline stages), makes the parameter groups (no weight decay on vectors) and the LR schedule,
and calls ``deepspeed.initialize``. The result says where this rank sits: its data-parallel rank and group, and
whether it holds the last pipeline stage (where losses are computed).
"""

import copy
import json
import math
import os
from dataclasses import dataclass

import torch

from megadoremi.config import ConfigError, ParallelConfig, TrainConfig
from megadoremi.distributed.plan import BatchPlan
from megadoremi.model.gpt import GPT, GPTConfig
from megadoremi.model.pipeline import build_pipeline_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_template_path(zero_stage: int) -> str:
    return os.path.join(REPO_ROOT, "ds_configs", f"zero{zero_stage}.json")


def load_template(parallel: ParallelConfig) -> dict:
    """The DeepSpeed JSON template (``parallel.ds_config_template`` or the shipped one for the ZeRO stage)."""
    path = parallel.ds_config_template or default_template_path(parallel.zero_stage)
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


def use_bf16(train: TrainConfig, cuda: bool) -> bool:
    """bf16 on GPU, fp32 on CPU, unless train.precision says otherwise."""
    return train.precision == "bf16" or (train.precision == "auto" and cuda)


def build_ds_config(train: TrainConfig, parallel: ParallelConfig, plan: BatchPlan, cuda: bool) -> dict:
    """The DeepSpeed JSON actually used: the template plus batch sizes, optimizer settings and precision."""
    ds = copy.deepcopy(load_template(parallel))
    ds.pop("_comment", None)
    ds["train_batch_size"] = plan.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["gradient_clipping"] = train.grad_clip
    ds.setdefault("zero_optimization", {})["stage"] = parallel.zero_stage
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    optimizer.setdefault("params", {}).update(
        {"lr": train.lr, "betas": list(train.betas), "eps": train.eps, "weight_decay": train.weight_decay}
    )
    ds["bf16"] = {"enabled": use_bf16(train, cuda)}
    ds.setdefault("steps_per_print", 10**9)
    return ds


def warmup_steps(train: TrainConfig) -> int:
    return int(round(train.warmup_fraction * train.steps))


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then exponential / cosine decay."""
    warmup = warmup_steps(train)
    if step < warmup:
        return train.lr * (step + 1) / warmup
    if train.decay == "constant":
        return train.lr
    progress = min(1.0, (step - warmup) / max(1, train.steps - warmup))
    if train.decay == "exponential":
        return train.lr * (train.min_lr / train.lr) ** progress
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(module: torch.nn.Module) -> list[dict]:
    """Weight decay on matrices only: norms' and biases' vectors go into a group without decay.

    The shape is the parameter's real one: under ZeRO-3 (``deepspeed.zero.Init``) a partitioned parameter's
    ``data`` is an empty 1-D tensor and its shape is ``ds_shape``; reading ``param.dim()`` put every matrix in the
    no-decay group, so ZeRO-3 runs trained without weight decay."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainingEngine:
    """The DeepSpeed engine and this rank's place in the layout."""

    engine: object  # deepspeed.DeepSpeedEngine or deepspeed.pipe.PipelineEngine
    model_config: GPTConfig
    ds_config: dict
    pipeline_parallel: bool
    zero_stage: int
    data_parallel_rank: int
    data_parallel_group: object  # None: the default (world) group
    is_last_stage: bool  # holds the loss (always True without pipeline stages)

    @property
    def bf16(self) -> bool:
        return bool(self.ds_config["bf16"]["enabled"])


def build_engine(model_config: GPTConfig, plan: BatchPlan, ds_config: dict, train: TrainConfig,
                 parallel: ParallelConfig, rank: int, activation_checkpointing: bool = False,
                 pipeline_loss_fn=None) -> TrainingEngine:
    """Build the model in its parallel form and the DeepSpeed engine around it (collective: every rank calls it).

    ``pipeline_loss_fn(logits, labels) -> scalar`` runs on the last pipeline stage (pipeline stages only).
    """
    import deepspeed

    seed = train.seed
    torch.manual_seed(seed)
    if plan.pipeline_parallel:
        if pipeline_loss_fn is None:
            raise ValueError("pipeline stages need a pipeline_loss_fn (the loss runs on the last stage)")
        model = build_pipeline_model(model_config, plan.pipeline_stages, pipeline_loss_fn, seed=seed,
                                     activation_checkpoint_interval=1 if activation_checkpointing else 0)
    else:
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=parallel.zero_stage == 3):
            model = GPT(model_config, seed=seed, activation_checkpointing=activation_checkpointing)

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, train) / train.lr)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_config,
                                           lr_scheduler=schedule)
    if not plan.pipeline_parallel and plan.data_parallel_size == 1 and parallel.zero_stage == 0:
        # One replica: DeepSpeed would still flatten, "all-reduce" and unflatten every gradient each step.
        engine.enable_backward_allreduce = False
    if plan.pipeline_parallel:
        dp_rank, dp_group = engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_group()
        last = engine.is_last_stage()
    else:
        dp_rank, dp_group, last = rank, None, True
    return TrainingEngine(engine, model_config, ds_config, plan.pipeline_parallel, parallel.zero_stage, dp_rank,
                          dp_group, last)
