"""Every slurm/ script submitted to a real one-node Slurm cluster with 2 tasks: preprocessing over 2 MPI ranks
under srun, reference -> proxy (reference-loss cache) -> main, and submit_pipeline.sh's chain of four jobs."""

import filecmp
import json
import os
import subprocess

import pytest
import yaml

from tests.helpers.corpus import DOMAINS
from tests.helpers.launch import read_jsonl, write_config
from tests.slurm.cluster import SLURM_DIR

STEPS = {"reference": 8, "proxy": 6, "main": 4}


def dataset_files(prefix: str) -> list[str]:
    return [prefix + ".bin", prefix + ".idx"]


def assert_same_datasets(data_dir: str, corpus: dict) -> None:
    """The preprocessed datasets equal build_tiny_corpus's (same tokenizer, one document per line, EOD)."""
    for name in DOMAINS:
        for made, expected in zip(dataset_files(os.path.join(data_dir, f"{name}_text_document")),
                                  dataset_files(corpus["domains"][name])):
            assert filecmp.cmp(made, expected, shallow=False), f"{made} differs from {expected}"


def assert_finished(run_dir: str, steps: int) -> dict:
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert final["status"] == "completed" and final["step"] == steps
    assert [r["step"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))] == list(range(1, steps + 1))
    return final


@pytest.fixture(scope="module")
def config(tiny_corpus, slurm_jobs):
    return write_config(os.path.join(slurm_jobs.workdir, "config.yaml"), tiny_corpus)


def test_preprocess_sbatch_splits_across_two_mpi_ranks(slurm_jobs, tiny_corpus):
    data_dir = os.path.join(slurm_jobs.workdir, "preprocessed")
    job = slurm_jobs.submit("preprocess.sbatch", CORPUS_DIR=os.path.join(tiny_corpus["root"], "corpus"),
                            TOKENIZER_MODEL=tiny_corpus["tokenizer_model"], DATA_DIR=data_dir)
    log = slurm_jobs.log(slurm_jobs.wait_completed(job))
    # srun --mpi=pmi2 gave mpi4py a 2-rank COMM_WORLD (with no PMI every task would be rank 0 of 1).
    assert log.count("rank 0/2:") == len(DOMAINS), log
    assert_same_datasets(data_dir, tiny_corpus)


def test_preprocess_sbatch_refuses_srun_without_pmi(slurm_jobs, tiny_corpus):
    data_dir = os.path.join(slurm_jobs.workdir, "preprocessed-no-pmi")
    job = slurm_jobs.submit("preprocess.sbatch", CORPUS_DIR=os.path.join(tiny_corpus["root"], "corpus"),
                            TOKENIZER_MODEL=tiny_corpus["tokenizer_model"], DATA_DIR=data_dir,
                            PREPROCESS_SRUN_ARGS="--mpi=none")
    info = slurm_jobs.cluster.wait_job(job)
    assert info["JobState"] == "FAILED"
    assert "MPI world of 1 in a job of 2 tasks" in slurm_jobs.log(info)
    assert os.listdir(data_dir) == []  # nothing written (two tasks would have written the same files)


@pytest.fixture(scope="module")
def reference_run(slurm_jobs, config):
    run_dir = os.path.join(slurm_jobs.workdir, "reference")
    job = slurm_jobs.submit("reference.sbatch", CONFIG=config, RUN_DIR=run_dir,
                            EXTRA_ARGS=f"--train.steps={STEPS['reference']}")
    return run_dir, slurm_jobs.wait_completed(job)


def test_reference_sbatch_trains_on_two_ranks(reference_run, slurm_jobs):
    run_dir, info = reference_run
    assert_finished(run_dir, STEPS["reference"])
    assert os.path.getsize(os.path.join(run_dir, "model.pt")) > 0
    assert info["NumTasks"] == "2" and info["Restarts"] == "0"
    assert "world 2 = 1 pipeline x 2 data-parallel" in slurm_jobs.log(info)


@pytest.fixture(scope="module")
def proxy_run(slurm_jobs, config, reference_run):
    run_dir = os.path.join(slurm_jobs.workdir, "proxy")
    cache = os.path.join(slurm_jobs.workdir, "ref_losses", "proxy")
    job = slurm_jobs.submit("proxy.sbatch", CONFIG=config, RUN_DIR=run_dir, REFERENCE_RUN_DIR=reference_run[0],
                            REFERENCE_LOSSES=cache, EXTRA_ARGS=f"--train.steps={STEPS['proxy']}")
    return run_dir, cache, slurm_jobs.wait_completed(job)


def test_proxy_sbatch_writes_domain_weights_from_cached_reference_losses(proxy_run):
    run_dir, cache, _ = proxy_run
    assert_finished(run_dir, STEPS["proxy"])
    resolved = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert resolved["doremi"]["enabled"] and resolved["doremi"]["reference_losses"] == cache
    assert os.path.exists(cache + ".npy") and os.path.exists(cache + ".json")
    weights = json.load(open(os.path.join(run_dir, "domain_weights.json")))
    assert sorted(weights) == sorted(DOMAINS) and abs(sum(weights.values()) - 1) < 1e-9
    assert max(abs(w - 1 / len(DOMAINS)) for w in weights.values()) > 1e-3  # the proxy moved the weights


def test_main_sbatch_trains_on_the_proxy_weights(slurm_jobs, config, proxy_run):
    weights_path = os.path.join(proxy_run[0], "domain_weights.json")
    run_dir = os.path.join(slurm_jobs.workdir, "main")
    job = slurm_jobs.submit("main.sbatch", CONFIG=config, RUN_DIR=run_dir, PROXY_RUN_DIR=proxy_run[0],
                            EXTRA_ARGS=f"--train.steps={STEPS['main']}")
    slurm_jobs.wait_completed(job)
    assert_finished(run_dir, STEPS["main"])
    resolved = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert resolved["data"]["weights"] == weights_path


def test_main_sbatch_fails_early_without_proxy_weights(slurm_jobs, config):
    job = slurm_jobs.submit("main.sbatch", CONFIG=config, RUN_DIR=os.path.join(slurm_jobs.workdir, "no-main"),
                            PROXY_RUN_DIR=os.path.join(slurm_jobs.workdir, "no-such-proxy"))
    info = slurm_jobs.cluster.wait_job(job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "1:0")
    assert "no-such-proxy/domain_weights.json: no such file" in slurm_jobs.log(info)


def test_make_deepspeed_hostfile_lists_the_job_nodes(slurm_jobs, slurm_cluster):
    script = os.path.join(slurm_jobs.workdir, "hostfile.sbatch")
    hostfile = os.path.join(slurm_jobs.workdir, "hostfile")
    with open(script, "w") as handle:
        handle.write(f'#!/bin/bash\nsource "$MEGADOREMI_ROOT/slurm/common.sh"\nmake_deepspeed_hostfile {hostfile}\n'
                     'echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS"\n')
    job = slurm_cluster.sbatch(script, "--ntasks-per-node=2", "--output=runs/logs/hostfile-%j.log",
                               cwd=slurm_jobs.workdir, **slurm_jobs.base_env)
    info = slurm_jobs.wait_completed(job)
    assert open(hostfile).read() == f"{slurm_cluster.hostname} slots=2\n"
    port = 20000 + job % 20000
    assert f"MASTER_ADDR={slurm_cluster.hostname} MASTER_PORT={port} OMP_NUM_THREADS=1" in slurm_jobs.log(info)


def test_submit_pipeline_chains_preprocess_reference_proxy_main(slurm_jobs, slurm_cluster, tiny_corpus):
    root = os.path.join(slurm_jobs.workdir, "pipeline")
    os.makedirs(root)
    data_dir = os.path.join(root, "data")
    domains = {name: os.path.join(data_dir, f"{name}_text_document") for name in DOMAINS}
    corpus = dict(tiny_corpus, domains=domains, root=root)  # datasets the first job will write
    config = write_config(os.path.join(root, "config.yaml"), corpus)
    env = slurm_cluster.env(**slurm_jobs.base_env, CONFIG=config, WORK_DIR=os.path.join(root, "runs"),
                            CORPUS_DIR=os.path.join(tiny_corpus["root"], "corpus"),
                            TOKENIZER_MODEL=tiny_corpus["tokenizer_model"], DATA_DIR=data_dir,
                            PREPROCESS_LAUNCHER="mpiexec",  # the documented alternative to srun --mpi=pmi2
                            EXTRA_ARGS="--train.steps=4", REFERENCE_ARGS="--train.steps=6")
    result = subprocess.run([os.path.join(SLURM_DIR, "submit_pipeline.sh")], capture_output=True, text=True,
                            env=env, cwd=slurm_jobs.workdir, timeout=60)
    assert result.returncode == 0, result.stderr
    jobs = dict(line.split() for line in result.stdout.splitlines())
    assert list(jobs) == ["preprocess", "reference", "proxy", "main"]
    ids = [int(jobs[stage]) for stage in jobs]
    for previous, later in zip(ids, ids[1:]):
        assert slurm_cluster.job(later)["Dependency"].startswith(f"afterok:{previous}")

    for job in ids:
        slurm_jobs.wait_completed(job)
    assert_same_datasets(data_dir, tiny_corpus)
    runs = os.path.join(root, "runs")
    assert os.path.exists(os.path.join(runs, "reference", "model.pt"))
    assert_finished(os.path.join(runs, "reference"), 6)
    weights_path = os.path.join(runs, "proxy", "domain_weights.json")
    assert sorted(json.load(open(weights_path))) == sorted(DOMAINS)
    assert_finished(os.path.join(runs, "main"), 4)
    resolved = yaml.safe_load(open(os.path.join(runs, "main", "config.yaml")))
    assert resolved["data"]["weights"] == weights_path
    for job in ids:  # logs in the submission directory
        assert slurm_cluster.job(job)["StdOut"].startswith(os.path.join(slurm_jobs.workdir, "runs", "logs"))
