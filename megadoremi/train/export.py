"""Write ``RUN_DIR/model.pt`` from a trained engine, whatever its layout: ZeRO-3 partitions are gathered,
pipeline stages are renamed and merged (file format: ``megadoremi.model.io``)."""

import glob
import os

import torch
import torch.distributed as dist

from megadoremi.distributed.engine import TrainingEngine
from megadoremi.model.io import MODEL_FILE, pipeline_to_gpt_names, write_model_file
from megadoremi.utils.fs import remove_quietly


def export_model(trained: TrainingEngine, run_dir: str, rank: int) -> str:
    """Collective: every rank calls it; rank 0 writes ``RUN_DIR/model.pt`` atomically. Returns its path."""
    path = os.path.join(run_dir, MODEL_FILE)
    engine, model_config = trained.engine, trained.model_config
    module = engine.module
    if trained.pipeline_parallel:
        parts_dir = os.path.join(run_dir, ".model-parts")
        if rank == 0:
            os.makedirs(parts_dir, exist_ok=True)
        dist.barrier()
        if trained.data_parallel_rank == 0:
            state = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
            torch.save(state, os.path.join(parts_dir, f"stage{engine.stage_id}.pt"))
        dist.barrier()
        if rank == 0:
            state = {}
            for part in sorted(glob.glob(os.path.join(parts_dir, "stage*.pt"))):
                state.update(torch.load(part, weights_only=True))
            state = pipeline_to_gpt_names(state, model_config.num_layers)
    elif trained.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    else:
        state = {k: v.detach().float().cpu() for k, v in module.state_dict().items()} if rank == 0 else None
    if rank == 0:
        write_model_file(state, model_config, path)
        if trained.pipeline_parallel:
            for part in glob.glob(os.path.join(run_dir, ".model-parts", "*.pt")):
                remove_quietly(part)
            os.rmdir(os.path.join(run_dir, ".model-parts"))
    if dist.is_initialized():
        dist.barrier()
    return path
