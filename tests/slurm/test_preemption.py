"""Which `scancel --signal=USR1` form reaches whom under Slurm (the srun tasks vs the batch shell), with
common.sh's batch-shell trap. The whole preemption path (every rank checkpoints and exits 75, common.sh requeues,
the requeued run resumes and ends exactly where an uninterrupted run does) is tested across two nodes in
tests/multinode/test_training.py."""

import os

import pytest

from tests.slurm.cluster import wait_until


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


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
