"""Checkpoints: DeepSpeed's engine state plus ours, made complete atomically and verified before they are trusted.

Layout: ``RUN_DIR/checkpoints/step_00000010/`` holds DeepSpeed's files (every rank writes its own), our
``trainer_state.json`` (step, data position, the layout it was written with, the loss objective's state, the
mixture policy's and the training stream's state), one ``rng_rank{R}.json`` per rank, ``MANIFEST.json`` (size and
SHA-256 of every file) and the ``COMPLETE`` marker. Save order: DeepSpeed's files and the RNG states (every rank)
-> barrier -> trainer state (rank 0) -> barrier -> every rank hashes its share of the files -> rank 0 writes the
manifest, then the marker (each a temporary name, then a rename). ``--resume auto`` considers only directories
with the marker, newest first, and resumes from the first whose files all match the manifest (every rank checks
its share, the verdict is gathered so all ranks agree); a damaged one is named in the log and skipped. An explicit
``--resume STEP|DIR`` stops with the reason instead. ``checkpoint.verify: false`` skips hashing (sizes are still
recorded and checked).
"""

import hashlib
import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from megadoremi.utils.cli import UserError
from megadoremi.utils.fs import atomic_output
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "MANIFEST.json"
HASH = "sha256"
_HASH_BUFFER = 8 << 20
_TAG_PATTERN = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong."""


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


def resume_candidates(resume: str, checkpoint_dir: str) -> tuple[list[str], bool]:
    """The checkpoints ``resume`` may use, in the order to try them, and whether it named one explicitly:
    ``auto`` (every complete one, newest first), ``none``, a step number, or a checkpoint directory."""
    if resume == "none":
        return [], False
    if resume == "auto":
        return [path for _, path in reversed(complete_checkpoints(checkpoint_dir))], False
    path = os.path.join(checkpoint_dir, tag_for_step(int(resume))) if resume.isdigit() else resume.rstrip("/")
    if not os.path.exists(os.path.join(path, COMPLETE_MARKER)):
        raise CheckpointError(f"--resume {resume}: {path} is not a complete checkpoint (no {COMPLETE_MARKER} "
                              "marker)")
    return [path], True


def resolve_resume(resume: str, checkpoint_dir: str) -> str | None:
    """The first candidate of ``resume_candidates`` (no verification)."""
    candidates, _ = resume_candidates(resume, checkpoint_dir)
    return candidates[0] if candidates else None


# --- RNG state: plain JSON, so that loading it can never run code -------------------------------------------


def rng_state() -> dict:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": {"kind": kind, "keys": keys.tolist(), "position": int(position), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], np.asarray(numpy["keys"], dtype=np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --- manifest: size and hash of every file ----------------------------------------------------------------


def _checkpoint_files(path: str) -> list[str]:
    """Every file under the checkpoint directory (relative, sorted), without the manifest and the marker."""
    files = []
    for root, _, names in os.walk(path):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), path)
            if relative not in (MANIFEST_FILE, COMPLETE_MARKER):
                files.append(relative)
    return sorted(files)


def file_digest(path: str) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read once with a large buffer."""
    digest = hashlib.new(HASH)
    size = 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(_HASH_BUFFER)
        view = memoryview(buffer)
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
            size += count
    return size, digest.hexdigest()


def _my_share(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def _gather(value, world: int) -> list:
    if world == 1 or not dist.is_initialized():
        return [value]
    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _describe_cost(entries: int, size: int, seconds: float) -> str:
    return f"{entries} file(s), {size / 1e6:.1f} MB in {seconds:.2f} s ({size / 1e6 / max(seconds, 1e-9):.0f} MB/s)"


def build_manifest(path: str, rank: int, world: int, hashing: bool) -> dict | None:
    """Collective: every rank records its share of the files; rank 0 gets the whole manifest (others None)."""
    files = _checkpoint_files(path) if rank == 0 else None
    if world > 1 and dist.is_initialized():
        holder = [files]
        dist.broadcast_object_list(holder, src=0)
        files = holder[0]
    started = time.perf_counter()
    entries = {}
    for relative in _my_share(files, rank, world):
        full = os.path.join(path, relative)
        if hashing:
            size, digest = file_digest(full)
            entries[relative] = {"size": size, HASH: digest}
        else:
            entries[relative] = {"size": os.path.getsize(full)}
    seconds = time.perf_counter() - started
    shares = _gather((entries, seconds), world)
    if rank != 0:
        return None
    merged = {}
    for share, _ in shares:
        merged.update(share)
    total = sum(entry["size"] for entry in merged.values())
    if hashing:
        logger.info("checkpoint manifest: hashed %s (slowest rank)", _describe_cost(len(merged), total,
                                                                                   max(s for _, s in shares)))
    return {"format": 1, "hash": HASH if hashing else None, "files": dict(sorted(merged.items()))}


def verify_checkpoint(path: str, rank: int, world: int, hashing: bool) -> list[str]:
    """Collective: every rank checks its share of the manifest's files (existence, size and, with ``hashing``,
    the hash); returns the problems found by all ranks (the same list on every rank), empty when it is sound."""
    problems, entries = [], {}
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(manifest_path):
        problems.append(f"{manifest_path}: missing")
    else:
        try:
            with open(manifest_path) as handle:
                manifest = json.load(handle)
            entries = manifest["files"]
            if manifest.get("hash") is None:
                hashing = False
        except (ValueError, KeyError, TypeError) as error:
            problems.append(f"{manifest_path}: unreadable manifest ({error})")
    started, checked = time.perf_counter(), 0
    for relative in _my_share(sorted(entries), rank, world):
        full, expected = os.path.join(path, relative), entries[relative]
        if not os.path.exists(full):
            problems.append(f"{full}: missing")
            continue
        size = os.path.getsize(full)
        if size != expected["size"]:
            problems.append(f"{full}: {size} bytes, the manifest says {expected['size']} (truncated or replaced)")
            continue
        if hashing and HASH in expected:
            _, digest = file_digest(full)
            checked += size
            if digest != expected[HASH]:
                problems.append(f"{full}: contents changed since it was written ({HASH} {digest[:12]}..., the "
                                f"manifest says {expected[HASH][:12]}...)")
    if hashing and entries:
        logger.info("verified %s: %s on rank %d", os.path.basename(path),
                    _describe_cost(len(_my_share(sorted(entries), rank, world)), checked,
                                   time.perf_counter() - started), rank)
    merged = []
    for share in _gather(problems, world):
        merged.extend(p for p in share if p not in merged)
    return merged


def choose_checkpoint(resume: str, checkpoint_dir: str, rank: int, world: int, hashing: bool,
                      layout: dict | None = None) -> str | None:
    """Collective: the checkpoint to resume from, verified. Rank 0 lists the candidates (so every rank considers
    the same ones); with ``auto`` a damaged checkpoint is logged and the previous complete one is tried. The
    chosen one's layout must be loadable into ``layout`` (this run's)."""
    path = _choose(resume, checkpoint_dir, rank, world, hashing)
    if path is not None and layout is not None:
        check_layout(path, read_trainer_state(path).get("layout"), layout)
    return path


def _choose(resume: str, checkpoint_dir: str, rank: int, world: int, hashing: bool) -> str | None:
    candidates, explicit = resume_candidates(resume, checkpoint_dir) if rank == 0 else (None, None)
    if world > 1 and dist.is_initialized():
        holder = [(candidates, explicit)]
        dist.broadcast_object_list(holder, src=0)
        candidates, explicit = holder[0]
    for path in candidates:
        if not os.path.exists(os.path.join(path, MANIFEST_FILE)):
            logger.warning("%s has no %s (written by an older version): resuming from it unverified", path,
                           MANIFEST_FILE)
            return path
        problems = verify_checkpoint(path, rank, world, hashing)
        if not problems:
            return path
        if explicit:
            raise CheckpointError(f"--resume {resume}: checkpoint {path} is damaged: " + "; ".join(problems))
        if rank == 0:
            logger.error("checkpoint %s is damaged, not resuming from it: %s", path, "; ".join(problems))
    if candidates and rank == 0:
        logger.error("no sound checkpoint in %s: starting from scratch", checkpoint_dir)
    return None


# --- save and load ------------------------------------------------------------------------------------------


def save_checkpoint(engine, checkpoint_dir: str, step: int, trainer_state: dict, rank: int, world: int,
                    keep_last: int, barrier, hashing: bool = True) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    tag = tag_for_step(step)
    path = os.path.join(checkpoint_dir, tag)
    if rank == 0 and os.path.exists(path):
        shutil.rmtree(path)  # an incomplete leftover of an interrupted save of the same step
    barrier()
    engine.save_checkpoint(checkpoint_dir, tag=tag, save_latest=False)
    with atomic_output(os.path.join(path, f"rng_rank{rank}.json"), "w") as handle:
        json.dump(rng_state(), handle)
    barrier()
    if rank == 0:
        with atomic_output(os.path.join(path, STATE_FILE), "w") as handle:
            json.dump(trainer_state, handle, indent=1, allow_nan=False)
    barrier()
    manifest = build_manifest(path, rank, world, hashing)
    if rank == 0:
        with atomic_output(os.path.join(path, MANIFEST_FILE), "w") as handle:
            json.dump(manifest, handle, indent=1)
        with atomic_output(os.path.join(path, COMPLETE_MARKER), "w") as handle:
            handle.write(f"{step}\n")
        for _, old in complete_checkpoints(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", path)
    barrier()
    return path


def read_trainer_state(path: str) -> dict:
    state_path = os.path.join(path, STATE_FILE)
    try:
        with open(state_path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: missing") from None
    except ValueError as error:
        raise CheckpointError(f"{state_path}: not valid JSON ({error})") from None


def describe_layout(layout: dict) -> str:
    return (f"ZeRO stage {layout['zero_stage']}, {layout['data_parallel_size']} data-parallel x "
            f"{layout['pipeline_stages']} pipeline stage(s) (world {layout['world_size']})")


def check_layout(path: str, saved: dict | None, current: dict) -> None:
    """Refuse to hand DeepSpeed a checkpoint written in a layout it cannot load into this run's, saying both."""
    if not saved:
        return  # written before layouts were recorded
    same_partitions = saved["data_parallel_size"] == current["data_parallel_size"] or saved["zero_stage"] == 0
    if saved["zero_stage"] == current["zero_stage"] and saved["pipeline_stages"] == current["pipeline_stages"] \
            and same_partitions:
        return
    raise CheckpointError(
        f"{path}: the checkpoint was written with {describe_layout(saved)}; this run asks for "
        f"{describe_layout(current)}. DeepSpeed loads optimizer partitions only into the layout that wrote them "
        "(ZeRO stage and pipeline stages equal, and the data-parallel size too for ZeRO 1-3). Resume with the "
        "checkpoint's layout, or convert it: see docs/reliability.md (zero_to_fp32.py / ds_to_universal)")


def load_checkpoint(engine, path: str, rank: int) -> dict:
    """Restore the engine (model, optimizer, LR schedule) and this rank's RNG; returns our trainer state."""
    state = read_trainer_state(path)
    checkpoint_dir, tag = os.path.split(path.rstrip("/"))
    loaded, _ = engine.load_checkpoint(checkpoint_dir, tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path}")
    rng_path = os.path.join(path, f"rng_rank{rank}.json")
    if os.path.exists(rng_path):
        try:
            with open(rng_path) as handle:
                set_rng_state(json.load(handle))
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{rng_path}: unreadable RNG state ({error})") from None
    elif os.path.exists(os.path.join(path, f"rng_rank{rank}.pt")):
        logger.warning("%s: RNG state in a pickled file of an older version, not loaded (loading pickles can run "
                       "code); the random state starts afresh", os.path.join(path, f"rng_rank{rank}.pt"))
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
