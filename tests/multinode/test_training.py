"""Training jobs across two nodes (network namespaces, tests/multinode/netns.py): slurm/main.sbatch and
slurm/proxy.sbatch with one rank per node equal a one-node 2-rank run of the same global batch; a 2-node job
preempted with `scancel --signal=USR1` checkpoints on both nodes, requeues and ends where an uninterrupted run
does; a node lost mid-run fails the job in bounded time, naming it, and the next run resumes."""

import json
import os
import time

import numpy as np
import pytest

from tests.helpers.launch import read_jsonl, run_training, write_config
from tests.slurm.cluster import SlurmError, count_lines, read_tail, wait_until

TWO_NODES = ("--nodes=2", "--ntasks-per-node=1")
# Long enough that a signal lands mid-run, short enough for several runs.
STEPS = 120
OVERRIDES = [f"--train.steps={STEPS}", "--train.seq_length=64"]
WEIGHTS = {"stdlib_code": 0.3, "licenses": 0.25, "arithmetic": 0.2, "boilerplate": 0.15, "random_chars": 0.1}


def losses(run_dir: str) -> list[float]:
    return [record["loss"] for record in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def setup(tiny_corpus, net_jobs):
    root = os.path.join(net_jobs.workdir, "training")
    os.makedirs(root)
    weights = os.path.join(root, "weights.json")
    with open(weights, "w") as handle:
        json.dump(WEIGHTS, handle)
    return {"root": root, "config": write_config(os.path.join(root, "config.yaml"), tiny_corpus),
            "weights": weights}


@pytest.fixture(scope="module")
def one_node_main(setup):
    """The same training as the 2-node main job, as 2 ranks on one host (torchrun, loopback)."""
    run_dir = os.path.join(setup["root"], "one_node_main")
    run_training("torchrun", 2, setup["config"], [f"--run_dir={run_dir}", f"--data.weights={setup['weights']}",
                                                  *OVERRIDES])
    return run_dir


def submit_main(net_jobs, setup, name: str, *extra: str, **env) -> tuple[str, int]:
    run_dir = os.path.join(setup["root"], name)
    job = net_jobs.submit("main.sbatch", *TWO_NODES, CONFIG=setup["config"], RUN_DIR=run_dir,
                          WEIGHTS=setup["weights"], EXTRA_ARGS=" ".join([*OVERRIDES, *extra]), **env)
    return run_dir, job


@pytest.fixture(scope="module")
def two_node_main(net_jobs, setup):
    run_dir, job = submit_main(net_jobs, setup, "two_node_main")
    return run_dir, net_jobs.wait_completed(job)


def test_main_sbatch_across_two_nodes_equals_one_node(two_node_main, one_node_main, net_jobs):
    run_dir, info = two_node_main
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2" and info["NumTasks"] == "2", info
    log = net_jobs.log(info)
    # The rendezvous is node1 (scontrol show hostnames), reached from node2 over the namespace network.
    assert "on 2 task(s) via srun, master node1:" in log, log[-3000:]
    assert "world 2 = 1 pipeline x 2 data-parallel" in log
    two, one = losses(run_dir), losses(one_node_main)
    assert len(two) == len(one) == STEPS
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert final["status"] == "completed" and final["step"] == STEPS


@pytest.fixture(scope="module")
def reference(setup):
    run_dir = os.path.join(setup["root"], "reference")
    run_training("torchrun", 2, setup["config"], [f"--run_dir={run_dir}", "--train.steps=10"])
    return run_dir


PROXY = ["--train.steps=6", "--doremi.order=lagged"]


def alpha_trajectory(run_dir: str) -> np.ndarray:
    records = read_jsonl(os.path.join(run_dir, "doremi_trajectory.jsonl"))
    return np.array([[record["weights"][name] for name in WEIGHTS] for record in records])


def test_proxy_sbatch_across_two_nodes_equals_one_node(net_jobs, setup, reference):
    """The 2-node job computes the reference-loss cache across both nodes (its own srun step), then trains the
    proxy from it; the one-node run computes reference losses live: the same alpha trajectory."""
    run_dir = os.path.join(setup["root"], "two_node_proxy")
    cache = os.path.join(setup["root"], "ref_losses", "proxy")
    job = net_jobs.submit("proxy.sbatch", *TWO_NODES, CONFIG=setup["config"], RUN_DIR=run_dir,
                          REFERENCE_RUN_DIR=reference, REFERENCE_LOSSES=cache, EXTRA_ARGS=" ".join(PROXY))
    log = net_jobs.log(net_jobs.wait_completed(job))
    assert "reference losses: computing" in log and os.path.exists(cache + ".npy")
    one_node = os.path.join(setup["root"], "one_node_proxy")
    run_training("torchrun", 2, setup["config"], [f"--run_dir={one_node}", "--doremi.enabled=true",
                                                  f"--doremi.reference_model={reference}", *PROXY])
    two, one = alpha_trajectory(run_dir), alpha_trajectory(one_node)
    assert two.shape == one.shape == (6, len(WEIGHTS))
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
    assert np.abs(two[-1] - 1 / len(WEIGHTS)).max() > 1e-3  # the weights moved: the comparison is not vacuous
    assert json.load(open(os.path.join(run_dir, "domain_weights.json"))).keys() == WEIGHTS.keys()


def test_usr1_preemption_of_a_two_node_job_requeues_and_resumes(net_jobs, net_cluster, setup, two_node_main):
    """scancel --signal=USR1 reaches the srun tasks on both nodes: both ranks checkpoint and exit 75, the job
    requeues and the resumed run ends exactly where the uninterrupted 2-node run did."""
    run_dir, job = submit_main(net_jobs, setup, "preempted")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    wait_until(net_cluster, job, lambda: count_lines(metrics) >= 5, "step 5")
    net_cluster.run("scancel", "--signal=USR1", str(job))
    assert count_lines(metrics) < STEPS, "the run ended before the signal: raise STEPS"
    info = net_jobs.wait_completed(job)
    log = net_jobs.log(info)
    marker = "received SIGUSR1: checkpointed at step "
    assert marker in log, log[-6000:]
    step = int(log.split(marker, 1)[1].split()[0])
    assert 0 < step < STEPS and info["Restarts"] == "1", info
    assert "Exited with exit code 75" in log and "requeueing job" in log
    assert f"resumed from {run_dir}/checkpoints/step_{step:08d} (step {step})" in log
    assert losses(run_dir) == losses(two_node_main[0])
    final, uninterrupted = (json.load(open(os.path.join(path, "final.json"))) for path in (run_dir, two_node_main[0]))
    assert final["final_loss"] == uninterrupted["final_loss"] and final["start_step"] == step


def wait_for_state(cluster, job: int, states: set, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = cluster.job(job)
        if info["JobState"] in states:
            return info
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job} still {info['JobState']} after {timeout_s:.0f} s, not in {states}\n"
                             f"{read_tail(info['StdOut'])}")
        time.sleep(0.2)


def node_states(cluster) -> dict:
    out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
    return dict(zip(out[::2], out[1::2]))


# The collective timeout the node-lost runs set (parallel.collective_timeout_s; the default is torch's 30 min). Below
# the earliest moment Slurm can kill the job for the lost node (SlurmdTimeout 10 s after node2's last answer, at
# most a ping interval before the cut, then KillWait 5 s before SIGKILL), so rank 0 always reports its timeout.
COLLECTIVE_TIMEOUT_S = 8


def test_a_node_lost_mid_run_fails_the_job_and_the_requeued_run_resumes(net_jobs, net_cluster, setup,
                                                                         two_node_main):
    """node2's cable is cut after the step-10 checkpoint: rank 0 on node1 stops at the collective timeout (no
    rank hangs), Slurm declares node2 lost (SlurmdTimeout) and requeues the job; when the cable is back, node2
    returns to service and the requeued run resumes from the last complete checkpoint and ends exactly where an
    uninterrupted run does."""
    run_dir, job = submit_main(net_jobs, setup, "node_lost", "--checkpoint.interval=10",
                               f"--parallel.collective_timeout_s={COLLECTIVE_TIMEOUT_S}")
    checkpoint = os.path.join(run_dir, "checkpoints", "step_00000010", "MANIFEST.json")
    wait_until(net_cluster, job, lambda: os.path.exists(checkpoint), "the step-10 checkpoint")
    net_cluster.fabric.set_link("node2", "down")
    cut = time.monotonic()
    try:
        assert count_lines(os.path.join(run_dir, "metrics.jsonl")) < STEPS, "the run ended before the cut"
        info = wait_for_state(net_cluster, job, {"PENDING", "FAILED", "NODE_FAIL", "CANCELLED", "COMPLETED"},
                              COLLECTIVE_TIMEOUT_S + net_cluster.slurmd_timeout_s + 60)
        ended_after_s = time.monotonic() - cut
        assert info["JobState"] == "PENDING" and info["Restarts"] == "1", info  # requeued by Slurm itself
        assert node_states(net_cluster)["node2"].startswith("down"), node_states(net_cluster)
        log = net_jobs.log(info)
        assert f"Timed out waiting {COLLECTIVE_TIMEOUT_S * 1000}ms" in log, log[-4000:]
        assert ("megadoremi-train: rank 0 of 2 on node1 failed: " in log
                and f"parallel.collective_timeout_s={COLLECTIVE_TIMEOUT_S} s" in log), log[-4000:]
        assert "Node failure on node2" in log and "DUE TO NODE FAILURE" in log, log[-4000:]
        assert ended_after_s < COLLECTIVE_TIMEOUT_S + net_cluster.slurmd_timeout_s + 40, ended_after_s
    finally:
        net_cluster.fabric.set_link("node2", "up")
    info = net_jobs.wait_completed(job)
    log = net_jobs.log(info)
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and f"{run_dir}/checkpoints/step_000000" in resumed[0], log[-4000:]
    assert losses(run_dir) == losses(two_node_main[0])
    deadline = time.monotonic() + 60  # both nodes back in service (after the job's completing phase)
    while node_states(net_cluster) != {"node1": "idle", "node2": "idle"} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert node_states(net_cluster) == {"node1": "idle", "node2": "idle"}


def test_a_rank_killed_on_one_node_fails_the_job_at_once_naming_it(net_jobs, net_cluster, setup):
    """SIGKILL of the rank on node2: rank 0's next collective fails at once (connection reset by node2) and the
    job fails with both the rank and the node named; nothing waits for a timeout."""
    run_dir, job = submit_main(net_jobs, setup, "rank_killed", "--train.steps=100000")
    wait_until(net_cluster, job, lambda: count_lines(os.path.join(run_dir, "metrics.jsonl")) >= 5, "step 5")
    ranks = [pid for pid in net_cluster.fabric.pids("node2")
             if "megadoremi.train" in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")]
    assert len(ranks) == 1, ranks
    os.kill(ranks[0], 9)
    killed = time.monotonic()
    info = net_jobs.cluster.wait_job(job, timeout_s=60)
    assert time.monotonic() - killed < 30
    assert info["JobState"] == "FAILED", info
    log = net_jobs.log(info)
    assert "srun: error: node2: task 1: Killed" in log, log[-4000:]
    assert "megadoremi-train: rank 0 of 2 on node1 failed: " in log and "(peer 10.213.0.12 = node2)" in log, \
        log[-4000:]


def test_deepspeed_hostfile_launch_across_two_nodes_equals_one_node(net_jobs, setup, one_node_main):
    """TRAIN_LAUNCHER=deepspeed: the batch script on node1 writes a hostfile of the job's nodes and DeepSpeed's
    launcher starts one rank per node with pdsh over ssh (sshd on each node); same losses as one node."""
    run_dir, job = submit_main(net_jobs, setup, "deepspeed_launcher", TRAIN_LAUNCHER="deepspeed")
    info = net_jobs.wait_completed(job)
    log = net_jobs.log(info)
    assert "via deepspeed, master node1:" in log and "deepspeed hostfile: node1 slots=1 node2 slots=1" in log, \
        log[-3000:]
    assert "Running on the following workers: node1,node2" in log, log[-3000:]
    assert "node2: " in log and "node_rank=1" in log  # rank 1 started on node2 through ssh
    np.testing.assert_allclose(losses(run_dir), losses(one_node_main), rtol=0, atol=1e-6)
