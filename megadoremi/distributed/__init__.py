"""Distributed environment discovery (deepspeed / torchrun / srun / mpirun) and process-group setup."""

from megadoremi.distributed.env import DistributedEnv, discover_environment, init_distributed

__all__ = ["DistributedEnv", "discover_environment", "init_distributed"]
