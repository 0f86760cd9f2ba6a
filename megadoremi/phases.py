"""A workflow phase's bookkeeping: the fingerprint of its inputs, setting a stale run aside, running its processes
with a log, and turning how they ended into one line.

Fingerprints. A phase records its inputs as ``{name: value}`` (a config field's value, a file's size and mtime or
its sha256, an upstream run's identity) in a small JSON file next to its outputs, written before the phase starts:
``{"version": 1, "fingerprint": sha256 of the inputs, "inputs": {...}}``. Before reusing the phase (or resuming
it from a checkpoint) the workflow compares the recorded inputs with the current ones; ``stale_reason`` says in
words which inputs changed, so the log can tell the user why a phase is redone. ``set_aside`` moves a stale run
directory out of the way (never deleting it) so that the new run does not resume its checkpoints.

Running. ``run_logged`` appends a phase's output to RUN_DIR/launch.log and echoes it; ``phase_exit_status`` reads
the status of a failed rank from the launcher's summary when the launcher (torchrun) exits 1 for every failure;
a run that diverged is also told by the RUN_DIR/diverged.json its trainer wrote during this attempt
(``new_divergence``); ``phase_failure`` is the one-line error and the status megadoremi-pipeline exits with.
"""

import codecs
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import time

from megadoremi.data.gpt_dataset import data_fingerprint
from megadoremi.train.health import DIVERGED_FILE
from megadoremi.train.run_lock import LOCK_FILE, RunLock
from megadoremi.utils.cli import EXIT_BUG, EXIT_DIVERGED, EXIT_REQUEUE
from megadoremi.utils.fs import atomic_output

FORMAT_VERSION = 1
RECORD_NAME = "phase_fingerprint.json"  # in a training phase's run directory
LAUNCH_LOG = "launch.log"  # in a training phase's run directory: every rank's output, appended per attempt
MAX_HASHED_BYTES = 64 << 20  # larger input files are identified by size and mtime, not read
_MAX_NAMES_SHOWN = 4
_HASH_CHUNK_BYTES = 1 << 20
_POLL_S = 0.2  # how often a phase's log is echoed
_STOP_GRACE_S = 10  # after Ctrl-C, how long the training processes get to stop before they are killed
_TAIL_BYTES = 64 * 1024  # the end of a phase's output searched for the launcher's failure summary
# A failed rank's status in a launcher's summary: torchrun's "  exitcode  : 3 (pid: ...)", MPICH's "=   EXIT CODE: 3".
_RANK_EXIT = re.compile(r"^[=\s]*exit ?code\s*:\s*(-?\d+)", re.IGNORECASE | re.MULTILINE)


# --- fingerprints --------------------------------------------------------------------------------------------


def digest(value) -> str:
    """sha256 (hex) of ``value``'s canonical JSON: key order does not matter, every other difference does."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_sha256(path: str) -> str:
    """sha256 (hex) of a file's content."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            sha.update(chunk)
    return sha.hexdigest()


def file_stat(path: str) -> dict:
    """What identifies a (possibly large) input file without reading it: absolute path, size, mtime in ns."""
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def file_identity(path: str):
    """A file's sha256 when it is small (a weights or tokenizer file), else its ``file_stat`` (a model, a loss
    cache); None when it does not exist (whoever reads it reports that)."""
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) > MAX_HASHED_BYTES:
        return file_stat(path)
    return {"sha256": file_sha256(path)}


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists and scalars are leaves)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_record(path: str) -> dict | None:
    """The record at ``path``; None when there is none. A record that cannot be read counts as none."""
    try:
        with open(path) as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"version": None, "inputs": {}}
    return record if isinstance(record, dict) else {"version": None, "inputs": {}}


def write_record(path: str, inputs: dict) -> None:
    """Record ``inputs`` at ``path`` (atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    record = {"version": FORMAT_VERSION, "fingerprint": digest(inputs), "inputs": inputs}
    with atomic_output(path, "w") as handle:
        json.dump(record, handle, indent=1, sort_keys=True, default=str)


def recorded_fingerprint(path: str) -> str | None:
    """The ``fingerprint`` of the record at ``path`` (None: no usable record)."""
    record = read_record(path)
    return record.get("fingerprint") if record and record.get("version") == FORMAT_VERSION else None


def changed_inputs(recorded: dict, inputs: dict) -> list[str]:
    """Names of the inputs that differ between ``recorded`` and ``inputs`` (added and removed ones too), sorted."""
    names = set(recorded) | set(inputs)
    # Compare canonical JSON: what was recorded went through JSON (tuples became lists, int keys strings).
    return sorted(name for name in names if name not in recorded or name not in inputs
                  or digest(recorded[name]) != digest(inputs[name]))


def stale_reason(path: str, inputs: dict) -> str | None:
    """None when the record at ``path`` holds exactly ``inputs``; else why not, in words for the log."""
    record = read_record(path)
    if record is None:
        return f"no input fingerprint recorded ({os.path.basename(path)} is missing: an older workdir?)"
    if record.get("version") != FORMAT_VERSION or not isinstance(record.get("inputs"), dict):
        return f"unreadable input fingerprint ({path})"
    changed = changed_inputs(record["inputs"], inputs)
    if not changed:
        return None
    shown = ", ".join(changed[:_MAX_NAMES_SHOWN])
    more = f" and {len(changed) - _MAX_NAMES_SHOWN} more" if len(changed) > _MAX_NAMES_SHOWN else ""
    return f"inputs changed ({shown}{more})"


def set_aside(path: str) -> str:
    """Rename ``path`` to ``PATH.stale-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ... if taken); returns the new path.
    A run directory a live training run holds (its ``run.lock``) is not moved: RunDirectoryInUse names the holder."""
    if os.path.exists(os.path.join(path, LOCK_FILE)):
        lock = RunLock(path)
        lock.acquire()  # raises RunDirectoryInUse while another run trains there
        lock.release()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = f"{path.rstrip(os.sep)}.stale-{stamp}"
    candidate, index = target, 1
    while os.path.lexists(candidate):
        index += 1
        candidate = f"{target}-{index}"
    os.rename(path, candidate)
    return candidate


def corpus_inputs(files: list[str]) -> dict:
    """Fingerprint inputs of corpus files: each one's path, size and mtime (an emptied or filled file differs)."""
    return {f"corpus file {os.path.basename(path)}": file_stat(path) for path in files}


def run_identity(path: str):
    """What identifies an upstream run a phase reads (a reference run directory): its recorded input fingerprint
    and its final.json's sha256 (retrained, it is a different model even with the same inputs); a file: its
    identity."""
    if not os.path.isdir(path):
        return file_identity(path)
    final = os.path.join(path, "final.json")
    return {"inputs": recorded_fingerprint(os.path.join(path, RECORD_NAME)),
            "final.json": file_sha256(final) if os.path.exists(final) else None}


def training_inputs(config: dict, nproc: int) -> dict:
    """What a training phase reads, for its fingerprint: every field of its config as written, the number of
    ranks, the content of the files the config names, and the identity of an upstream reference run."""
    inputs = flatten(config)
    inputs["--nproc"] = nproc
    for key in ("data.tokenizer_model", "data.weights", "mixing.schedule", "doremi.reference_losses",
                "doremi.initial_weights"):
        path = inputs.get(key)
        if isinstance(path, str) and path:
            inputs[f"{key} fingerprint"] = file_identity(path)
    for name, prefix in config["data"]["domains"].items():
        try:
            inputs[f"data.domains.{name} fingerprint"] = data_fingerprint(prefix)
        except FileNotFoundError:
            inputs[f"data.domains.{name} fingerprint"] = None  # the trainer reports the missing dataset
    reference = inputs.get("doremi.reference_model")
    if isinstance(reference, str) and reference:
        inputs["doremi.reference_model fingerprint"] = run_identity(reference)
    return inputs


# --- running ------------------------------------------------------------------------------------------------


class PhaseFailed(Exception):
    """A phase's training processes failed; ``exit_status`` is what megadoremi-pipeline exits with."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def run_logged(command: list[str], env: dict, log_path: str) -> tuple[int, str]:
    """Run ``command`` with its stdout and stderr appended to ``log_path``, echoed to our stderr as the file
    grows; returns the exit status and the end of this run's output. The processes write to the file, not to a
    pipe, so they can still finish (and checkpoint) if this process dies."""
    with open(log_path, "ab") as log, open(log_path, "rb") as follower:
        start = follower.seek(0, os.SEEK_END)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                finished = process.poll() is not None
                chunk = follower.read()
                if chunk:
                    sys.stderr.write(decoder.decode(chunk))
                    sys.stderr.flush()
                if finished:
                    break
                time.sleep(_POLL_S)
        except BaseException:
            # Ctrl-C reached the training processes too (same process group): let them stop on their own first.
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except BaseException:  # still running, or a second Ctrl-C
                process.kill()
                process.wait()
            raise
        end = follower.tell()
        follower.seek(max(start, end - _TAIL_BYTES))
        return process.returncode, follower.read(end - follower.tell()).decode(errors="replace")


def phase_exit_status(returncode: int, output: str) -> int:
    """The training processes' status: the launcher's own, or, when a launcher summarises a failed rank in its
    output and exits 1 for it (torchrun), that rank's; EXIT_DIVERGED when any rank diverged."""
    if returncode == 0:
        return 0
    rank_statuses = [int(code) for code in _RANK_EXIT.findall(output)]
    if returncode == EXIT_DIVERGED or EXIT_DIVERGED in rank_statuses:
        return EXIT_DIVERGED
    # torchrun lists the other failures first and the root cause (the first failure) last.
    return rank_statuses[-1] if rank_statuses and rank_statuses[-1] != 0 else returncode


def file_version(path: str) -> tuple | None:
    """(inode, mtime, size) of ``path``, None if absent: a file replaced or rewritten has another version."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def new_divergence(run_dir: str, version_before: tuple | None) -> dict | None:
    """The RUN_DIR/diverged.json the trainer wrote since ``version_before`` (``file_version`` before the launch),
    else None; ``{}`` when it cannot be read."""
    path = os.path.join(run_dir, DIVERGED_FILE)
    if file_version(path) in (None, version_before):
        return None
    try:
        with open(path) as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def phase_failure(run_dir: str, status: int, diverged: dict | None = None) -> PhaseFailed:
    """The one-line error for a failed training phase, and the status megadoremi-pipeline exits with;
    ``diverged``: what the run's diverged.json says (None: it wrote none)."""
    log = os.path.join(run_dir, LAUNCH_LOG)
    if diverged is not None or status == EXIT_DIVERGED:
        step = diverged.get("step") if diverged else None
        files = ", ".join(os.path.join(run_dir, name) for name in
                          ([DIVERGED_FILE] if diverged is not None else []) + [LAUNCH_LOG, "metrics.jsonl"])
        return PhaseFailed(
            f"phase {run_dir} diverged{f' at step {step}' if step is not None else ''}: its loss or gradient norm "
            f"became non-finite (exit status {status}); see {files}. Later phases were not run; rerunning with the "
            "same settings resumes it from its last checkpoint, other settings (e.g. a lower --lr) retrain it",
            EXIT_DIVERGED)
    if status == EXIT_REQUEUE:
        return PhaseFailed(f"phase {run_dir} checkpointed and stopped on a signal (exit status {status}); rerun the "
                           "workflow to resume it", status)
    if status == 0:
        return PhaseFailed(f"phase {run_dir} exited without finishing (no final.json; train.exit_interval?); see "
                           f"{log}. Rerunning the workflow resumes it from its last checkpoint", EXIT_BUG)
    how = f"was killed by signal {-status}" if status < 0 else f"failed (exit status {status})"
    exit_status = 128 - status if status < 0 else status if status < 256 else EXIT_BUG
    return PhaseFailed(f"phase {run_dir} {how}; see {log}. Rerunning the workflow resumes it from its last "
                       "checkpoint", exit_status)
