"""Checkpoints: DeepSpeed's engine state plus ours, made complete atomically.

Layout: ``RUN_DIR/checkpoints/step_00000010/`` holds DeepSpeed's files (every rank writes its own), our
``trainer_state.json`` (step, data position, the loss objective's state, the mixture policy's and the training
stream's state) and one ``rng_rank{R}.pt`` per rank. Only when every
rank has finished writing (barrier) does rank 0 write the ``COMPLETE`` marker (temporary name, then rename).
``--resume auto`` picks the newest directory that has the marker, so an interrupted save is never resumed from.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from megadoremi.utils.fs import atomic_output
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
_TAG_PATTERN = re.compile(r"^step_(\d{8})$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        match = _TAG_PATTERN.match(name)
        path = os.path.join(checkpoint_dir, name)
        if match and os.path.exists(os.path.join(path, COMPLETE_MARKER)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str, checkpoint_dir: str) -> str | None:
    """The checkpoint directory to resume from: ``auto`` (newest complete, or None), ``none``, or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        complete = complete_checkpoints(checkpoint_dir)
        return complete[-1][1] if complete else None
    path = resume.rstrip("/")
    if not os.path.exists(os.path.join(path, COMPLETE_MARKER)):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    return path


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, checkpoint_dir: str, step: int, trainer_state: dict, rank: int, keep_last: int,
                    barrier) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    tag = tag_for_step(step)
    path = os.path.join(checkpoint_dir, tag)
    if rank == 0 and os.path.exists(path):
        shutil.rmtree(path)  # an incomplete leftover of an interrupted save of the same step
    barrier()
    engine.save_checkpoint(checkpoint_dir, tag=tag, save_latest=False)
    torch.save(rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
    barrier()
    if rank == 0:
        with atomic_output(os.path.join(path, STATE_FILE), "w") as handle:
            json.dump(trainer_state, handle, indent=1)
        with atomic_output(os.path.join(path, COMPLETE_MARKER), "w") as handle:
            handle.write(f"{step}\n")
        for _, old in complete_checkpoints(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", path)
    barrier()
    return path


def load_checkpoint(engine, path: str, rank: int) -> dict:
    """Restore the engine (model, optimizer, LR schedule) and this rank's RNG; returns our trainer state."""
    checkpoint_dir, tag = os.path.split(path.rstrip("/"))
    loaded, _ = engine.load_checkpoint(checkpoint_dir, tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    with open(os.path.join(path, STATE_FILE)) as handle:
        state = json.load(handle)
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state


def objective_state(state: dict) -> dict:
    """``{"name", "state"}`` of the loss objective saved in a trainer state (older checkpoints kept a DoReMi
    proxy's state under ``doremi`` and nothing for a plain run)."""
    if "objective" in state:
        return state["objective"]
    if "doremi" in state:
        return {"name": "doremi", "state": state["doremi"]}
    return {"name": "lm", "state": {}}
