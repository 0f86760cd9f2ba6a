"""The batch plan, computed once: how the processes split into pipeline stages x data-parallel replicas, and the
batch sizes that follow.

global batch = micro batch x gradient accumulation x data-parallel size, where data-parallel size = world size /
pipeline stages. The DeepSpeed JSON (``megadoremi.distributed.engine.build_ds_config``) gets exactly these
numbers (never written by hand in two places), and both are saved in the run directory.
"""

from dataclasses import asdict, dataclass

from megadoremi.config import ConfigError, ParallelConfig, TrainConfig
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)


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

    @property
    def pipeline_parallel(self) -> bool:
        return self.pipeline_stages > 1

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_batch_plan(train: TrainConfig, parallel: ParallelConfig, world_size: int) -> BatchPlan:
    """Check that the processes split into pipeline stages x data-parallel replicas, and size the batch."""
    stages = parallel.pipeline_stages
    if world_size % stages:
        raise ConfigError(
            f"parallel.pipeline_stages={stages} does not divide the world size {world_size}: "
            f"cannot split {world_size} processes into pipeline stages"
        )
    dp = world_size // stages
    if stages > 1 and train.grad_accum < stages:
        # Not an error, but the pipeline would mostly idle: say so early.
        logger.warning("train.grad_accum=%d < pipeline_stages=%d: the pipeline bubble dominates; use more "
                       "micro-batches", train.grad_accum, stages)
    return BatchPlan(world_size, stages, dp, train.micro_batch_size, train.grad_accum,
                     train.micro_batch_size * train.grad_accum * dp, train.seq_length)
