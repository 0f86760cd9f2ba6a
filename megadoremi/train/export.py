"""A consolidated copy of the trained weights: ``RUN_DIR/model.pt`` = {"config": GPTConfig fields,
"state_dict": plain ``GPT`` parameter names}, whatever the layout it was trained with (ZeRO-3 partitions are
gathered, pipeline stages are renamed and merged). DoReMi loads the reference model from it."""

import dataclasses
import glob
import os

import torch
import torch.distributed as dist

from megadoremi.model.gpt import GPT, GPTConfig
from megadoremi.utils.fs import remove_quietly, temp_path_for

MODEL_FILE = "model.pt"


def _pipeline_to_gpt_names(state: dict, num_layers: int) -> dict:
    """PipelineModule keys (``3.attn.qkv.weight``, ``tied_modules.embedding.weight``) -> GPT keys."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("tied_modules."):
            renamed["embedding." + key.split(".", 2)[2]] = value
            continue
        index, rest = key.split(".", 1)
        index = int(index)
        if index == 0:
            renamed[f"embedding.{rest}"] = value
        elif index <= num_layers:
            renamed[f"blocks.{index - 1}.{rest}"] = value
        else:  # PipeFinal wraps a Head: head.norm.* / head.proj.*
            renamed[rest] = value
    return renamed


def export_model(engine, model_config: GPTConfig, run_dir: str, rank: int, pipeline: bool,
                 zero_stage: int) -> str | None:
    """Collective: every rank calls it; rank 0 writes ``RUN_DIR/model.pt`` atomically. Returns its path."""
    path = os.path.join(run_dir, MODEL_FILE)
    module = engine.module
    if pipeline:
        parts_dir = os.path.join(run_dir, ".model-parts")
        if rank == 0:
            os.makedirs(parts_dir, exist_ok=True)
        dist.barrier()
        if engine.grid.get_data_parallel_rank() == 0:
            state = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
            torch.save(state, os.path.join(parts_dir, f"stage{engine.stage_id}.pt"))
        dist.barrier()
        if rank == 0:
            state = {}
            for part in sorted(glob.glob(os.path.join(parts_dir, "stage*.pt"))):
                state.update(torch.load(part, weights_only=True))
            state = _pipeline_to_gpt_names(state, model_config.num_layers)
    elif zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    else:
        state = {k: v.detach().float().cpu() for k, v in module.state_dict().items()} if rank == 0 else None
    if rank == 0:
        write_model_file(state, model_config, path)
        if pipeline:
            for part in glob.glob(os.path.join(run_dir, ".model-parts", "*.pt")):
                remove_quietly(part)
            os.rmdir(os.path.join(run_dir, ".model-parts"))
    if dist.is_initialized():
        dist.barrier()
    return path


def write_model_file(state: dict, model_config: GPTConfig, path: str) -> str:
    """Write ``{"config", "state_dict"}`` atomically after checking the names against the GPT; returns ``path``."""
    with torch.device("meta"):
        expected = set(GPT(model_config).state_dict())
    if set(state) != expected:
        raise RuntimeError(f"export: parameter names do not match the GPT: {sorted(set(state) ^ expected)[:5]}")
    tmp = temp_path_for(path)
    try:
        torch.save({"config": dataclasses.asdict(model_config), "state_dict": state}, tmp)
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)
    return path


def load_exported_model(path: str) -> tuple[GPTConfig, dict]:
    """(config, state_dict) of a ``model.pt``; a run directory is accepted too."""
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no exported model (a finished run writes RUN_DIR/{MODEL_FILE})")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    return GPTConfig(**payload["config"]), payload["state_dict"]
