"""The weights of a run as one plain ``GPT`` state dict, from whatever it left: its ``model.pt``, or a DeepSpeed
checkpoint of any layout, read on one process without the training world size.

- ``model.pt`` (a finished run): as written (float32).
- ZeRO 1-3 and bf16 checkpoints without pipeline stages: DeepSpeed's ``zero_to_fp32`` gathers the fp32 master
  partitions of every rank's optimizer file.
- ZeRO-0 without pipeline stages: the engine's module states, in the training precision (a bf16 run's bf16
  weights; its fp32 master copy is not read).
- Pipeline stages (ZeRO 0 or 1): the per-layer files and the tied-embedding file, renamed to GPT names; these
  are the module weights in the training precision (under bf16 the fp32 masters stay in the optimizer files).

A checkpoint is verified against its MANIFEST (sizes and SHA-256) before DeepSpeed's files are unpickled, and
``trainer_state.json`` supplies the model config and the layout.
"""

import contextlib
import glob
import io
import os

import torch

from megadoremi.model.gpt import GPT, GPTConfig
from megadoremi.model.io import MODEL_FILE, load_exported_model, pipeline_to_gpt_names
from megadoremi.model.pipeline import TIED_KEY, tied_checkpoint_path
from megadoremi.train.checkpoint import CheckpointError, STATE_FILE, complete_checkpoints, read_trainer_state, \
    verify_checkpoint


def resolve_source(source: str) -> tuple[str, str]:
    """("model", path to a model.pt) or ("checkpoint", a checkpoint directory) for a model file, a run directory
    (its model.pt, else its newest complete checkpoint), a checkpoints directory or one checkpoint."""
    if os.path.isfile(source):
        return "model", source
    if not os.path.isdir(source):
        raise CheckpointError(f"{source}: no such file or directory")
    if os.path.isfile(os.path.join(source, MODEL_FILE)):
        return "model", os.path.join(source, MODEL_FILE)
    if os.path.isfile(os.path.join(source, STATE_FILE)):
        return "checkpoint", source
    checkpoints = os.path.join(source, "checkpoints")
    for directory in (checkpoints, source):
        complete = complete_checkpoints(directory) if os.path.isdir(directory) else []
        if complete:
            return "checkpoint", complete[-1][1]
    raise CheckpointError(f"{source}: neither a model file, a run directory with {MODEL_FILE} or complete "
                          "checkpoints, nor a checkpoint directory")


def load_weights(source: str) -> tuple[GPTConfig, dict, str]:
    """(model config, float32 GPT state dict, what was read) for ``source`` (see ``resolve_source``)."""
    kind, path = resolve_source(source)
    if kind == "model":
        config, state = load_exported_model(path)
        return config, {name: value.float() for name, value in state.items()}, path
    return checkpoint_weights(path) + (path,)


def checkpoint_weights(path: str) -> tuple[GPTConfig, dict]:
    """(config, float32 state dict) of one DeepSpeed checkpoint directory written by the trainer."""
    trainer_state = read_trainer_state(path)
    if "model_config" not in trainer_state or "layout" not in trainer_state:
        raise CheckpointError(f"{path}: {STATE_FILE} has no model config or layout (written by an older version); "
                              f"export the finished run's {MODEL_FILE} instead")
    config = GPTConfig(**trainer_state["model_config"])
    problems = verify_checkpoint(path, rank=0, world=1, hashing=True)
    if problems:
        raise CheckpointError(f"{path}: damaged checkpoint: " + "; ".join(problems))
    layout = trainer_state["layout"]
    if layout["pipeline_stages"] > 1:
        state = _pipeline_weights(path, config)
    elif layout["zero_stage"] >= 1 or glob.glob(os.path.join(path, "bf16_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
    else:
        files = glob.glob(os.path.join(path, "mp_rank_00_model_states.pt"))
        if not files:
            raise CheckpointError(f"{path}: no mp_rank_00_model_states.pt (a ZeRO-0 checkpoint writes one)")
        # A DeepSpeed file holds more than tensors; the manifest check above vouches for it.
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    state = {name: value.float() for name, value in state.items()}
    with torch.device("meta"):
        expected = set(GPT(config).state_dict())
    if set(state) != expected:
        raise CheckpointError(f"{path}: the weights do not match the recorded model config: "
                              f"{sorted(set(state) ^ expected)[:5]}")
    return config, state


def _pipeline_weights(path: str, config: GPTConfig) -> dict:
    weights = {}
    for file in sorted(glob.glob(os.path.join(path, "layer_*-model_states.pt"))):
        index = int(os.path.basename(file).split("-")[0][len("layer_"):])
        for name, value in torch.load(file, map_location="cpu", weights_only=True).items():
            weights[f"{index}.{name}"] = value
    if config.tied_embeddings:
        tied = tied_checkpoint_path(path, TIED_KEY)
        if not os.path.exists(tied):
            raise CheckpointError(f"{tied}: missing; pipeline checkpoints of older versions lack the tied embedding "
                                  "and cannot be exported")
        for name, value in torch.load(tied, map_location="cpu", weights_only=True).items():
            weights[f"tied_modules.{TIED_KEY}.{name}"] = value
    return pipeline_to_gpt_names(weights, config.num_layers)
