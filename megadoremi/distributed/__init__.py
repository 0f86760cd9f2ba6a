"""Distributed set-up, applied from outside the model: launcher discovery (deepspeed / torchrun / srun / mpirun)
and process groups (``env``), the batch plan (``plan``), the DeepSpeed engine (``engine``) and the per-domain
statistics reduced over a passed group (``stats``)."""

from megadoremi.distributed.env import DistributedEnv, discover_environment, init_distributed

__all__ = ["DistributedEnv", "discover_environment", "init_distributed"]
