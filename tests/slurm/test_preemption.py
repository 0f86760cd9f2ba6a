"""Preemption under Slurm: `scancel --signal=USR1` reaches the srun tasks, every rank checkpoints and exits 75,
slurm/common.sh requeues the job, and the requeued run resumes and ends exactly where an uninterrupted run does.
Also which scancel form reaches whom (tasks vs batch shell) with common.sh's batch-shell trap."""

import json
import os
import time

import pytest

from tests.helpers.launch import read_jsonl, write_config
from tests.slurm.cluster import JOB_TIMEOUT_S, SlurmError, read_tail

# Long enough that the signal lands mid-run (a step takes ~10-50 ms here), short enough for two runs.
STEPS = 150
SIGNAL_AFTER_STEPS = 5
OVERRIDES = f"--train.steps={STEPS} --train.seq_length=64"


def count_lines(path: str) -> int:
    try:
        with open(path) as handle:
            return sum(1 for line in handle if line.strip())
    except FileNotFoundError:
        return 0


def wait_until(cluster, job: int, condition, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Poll ``condition()`` while the job is queued or running; fail if it ends (or times out) first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        info = cluster.job(job)
        if info["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING"):
            raise SlurmError(f"job {job} is {info['JobState']} before {what}\n{read_tail(info['StdOut'])}")
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job}: no {what} after {timeout_s:.0f} s\n{read_tail(info['StdOut'])}")
        time.sleep(0.05)


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


@pytest.fixture(scope="module")
def config(tiny_corpus, slurm_jobs):
    os.makedirs(os.path.join(slurm_jobs.workdir, "preemption"), exist_ok=True)
    return write_config(os.path.join(slurm_jobs.workdir, "preemption", "config.yaml"), tiny_corpus)


@pytest.fixture(scope="module")
def preempted(slurm_jobs, slurm_cluster, config):
    """A reference job sent SIGUSR1 (scancel --signal=USR1: the job steps' tasks, not the batch shell) mid-run."""
    run_dir = os.path.join(slurm_jobs.workdir, "preemption", "preempted")
    job = slurm_jobs.submit("reference.sbatch", CONFIG=config, RUN_DIR=run_dir, EXTRA_ARGS=OVERRIDES)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    wait_until(slurm_cluster, job, lambda: count_lines(metrics) >= SIGNAL_AFTER_STEPS, f"step {SIGNAL_AFTER_STEPS}")
    slurm_cluster.run("scancel", "--signal=USR1", str(job))
    assert count_lines(metrics) < STEPS, "the run ended before the signal: raise STEPS"
    info = slurm_jobs.wait_completed(job)
    return run_dir, info


@pytest.fixture(scope="module")
def uninterrupted(slurm_jobs, config):
    run_dir = os.path.join(slurm_jobs.workdir, "preemption", "uninterrupted")
    job = slurm_jobs.submit("reference.sbatch", CONFIG=config, RUN_DIR=run_dir, EXTRA_ARGS=OVERRIDES)
    slurm_jobs.wait_completed(job)
    return run_dir


def stopped_step(log: str) -> int:
    marker = "received SIGUSR1: checkpointed at step "
    assert marker in log, log[-6000:]
    return int(log.split(marker, 1)[1].split()[0])


def test_usr1_checkpoints_requeues_and_resumes(preempted, slurm_jobs):
    run_dir, info = preempted
    log = slurm_jobs.log(info)
    step = stopped_step(log)
    assert 0 < step < STEPS
    assert info["Restarts"] == "1", info  # requeued exactly once, by slurm/common.sh (scontrol requeue)
    assert "Exited with exit code 75" in log and "requeueing job" in log
    assert f"resumed from {run_dir}/checkpoints/step_{step:08d} (step {step})" in log
    assert f"[job {info['JobId']} restart 1] training finished" in log  # one log, appended
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{step:08d}"))
    # The resumed run rewrote the metrics after the checkpoint: every step exactly once.
    assert [r["step"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))] == list(range(1, STEPS + 1))


def test_resumed_run_matches_an_uninterrupted_run(preempted, uninterrupted):
    resumed = read_jsonl(os.path.join(preempted[0], "metrics.jsonl"))
    reference = read_jsonl(os.path.join(uninterrupted, "metrics.jsonl"))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    final_resumed = json.load(open(os.path.join(preempted[0], "final.json")))
    final_reference = json.load(open(os.path.join(uninterrupted, "final.json")))
    assert final_resumed["final_loss"] == final_reference["final_loss"]
    assert final_resumed["eval"]["val_loss"] == final_reference["eval"]["val_loss"]
    assert final_resumed["start_step"] > 0 and final_reference["start_step"] == 0


# srun tasks that report SIGUSR1; the batch script sources common.sh (its SIGUSR1 trap) and reports surviving.
SIGNAL_TASK = """import os, signal, time
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
print(f"task {os.environ['SLURM_PROCID']} ready", flush=True)
deadline = time.monotonic() + 8
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
print(f"task {os.environ['SLURM_PROCID']} {'got SIGUSR1' if got else 'no signal'}", flush=True)
"""
SIGNAL_JOB = """#!/bin/bash
source "$MEGADOREMI_ROOT/slurm/common.sh"
srun --mpi=none python {task}
echo "batch shell finished"
"""


@pytest.mark.parametrize("scancel_args, tasks_signalled, shell_signalled", [
    ((), True, False),          # what the scripts rely on: the job steps' tasks only
    (("--full",), True, True),  # the batch shell too: common.sh's trap keeps bash (and the job) alive
    (("--batch",), False, True),  # the batch shell only: training would never hear it
])
def test_which_scancel_reaches_the_srun_tasks(slurm_jobs, slurm_cluster, scancel_args, tasks_signalled,
                                               shell_signalled):
    name = "usr1_probe" + "".join(scancel_args).replace("-", "_")
    task, script = (os.path.join(slurm_jobs.workdir, f"{name}{ext}") for ext in (".py", ".sbatch"))
    with open(task, "w") as handle:
        handle.write(SIGNAL_TASK)
    with open(script, "w") as handle:
        handle.write(SIGNAL_JOB.format(task=task))
    job = slurm_cluster.sbatch(script, "--ntasks=2", f"--output=runs/logs/{name}-%j.log", cwd=slurm_jobs.workdir,
                               **slurm_jobs.base_env)
    log_path = os.path.join(slurm_jobs.workdir, "runs", "logs", f"{name}-{job}.log")
    wait_until(slurm_cluster, job, lambda: read_text(log_path).count(" ready") == 2, "both tasks ready")
    slurm_cluster.run("scancel", "--signal=USR1", *scancel_args, str(job))
    info = slurm_jobs.wait_completed(job)  # never killed: not even by --full
    log = slurm_jobs.log(info)
    assert log.count("got SIGUSR1") == (2 if tasks_signalled else 0), log
    assert ("batch shell: SIGUSR1" in log) == shell_signalled, log
    assert "batch shell finished" in log
