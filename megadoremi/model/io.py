"""The consolidated model file: ``RUN_DIR/model.pt`` = {"config": GPTConfig fields, "state_dict": plain ``GPT``
parameter names}, whatever layout the model was trained with. DoReMi loads the reference model from it."""

import dataclasses
import os
import pickle

import torch

from megadoremi.model.gpt import GPT, GPTConfig
from megadoremi.utils.cli import UserError
from megadoremi.utils.fs import remove_quietly, temp_path_for

MODEL_FILE = "model.pt"


def model_file_path(path: str) -> str:
    """``path`` itself, or ``path/model.pt`` when ``path`` is a run directory."""
    return os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path


def pipeline_to_gpt_names(state: dict, num_layers: int) -> dict:
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
    path = model_file_path(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no exported model (a finished run writes RUN_DIR/{MODEL_FILE})")
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or not {"config", "state_dict"} <= set(payload):
        raise UserError(f"{path}: not a megadoremi model file (expected the keys config and state_dict)")
    try:
        return GPTConfig(**payload["config"]), payload["state_dict"]
    except TypeError as error:
        raise UserError(f"{path}: the model config does not match this version's GPTConfig: {error}") from None


def safe_torch_load(path: str):
    """``torch.load(path, weights_only=True)``: tensors and plain data only. A file that needs more (a pickle
    that would import or call arbitrary Python) is refused with an error naming it instead of being executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message: boilerplate lines around the one that says what was found
        boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
        detail = " ".join(line.strip() for line in str(error).splitlines()
                          if line.strip() and not line.strip().startswith(boilerplate)) or type(error).__name__
        if "GLOBAL" in detail:
            raise UserError(f"{path}: refused to load: the file holds more than tensors and plain data, which could "
                            f"run arbitrary code when loaded ({detail})") from None
        raise UserError(f"{path}: cannot read it as a torch file ({detail})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UserError(f"{path}: cannot read it as a torch file ({error})") from None
