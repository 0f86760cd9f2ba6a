"""Start real training processes (python, torchrun, deepspeed, mpiexec) and read what they wrote."""

import json
import os
import socket
import subprocess
import sys

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: str, corpus: dict, **sections) -> str:
    """A tiny-preset experiment over the test corpus; ``sections`` override whole keys of each section."""
    config = {
        "run_dir": os.path.join(os.path.dirname(path), "run"),
        "model": {"preset": "tiny"},
        "data": {"tokenizer_model": corpus["tokenizer_model"], "domains": corpus["domains"], "split": "90,10,0",
                 "cache_dir": os.path.join(corpus["root"], "index-cache")},
        "train": {"steps": 5, "micro_batch_size": 4, "grad_accum": 1, "seq_length": 32, "lr": 3e-3,
                  "min_lr": 3e-4, "warmup_fraction": 0.0, "seed": 7},
        "eval": {"interval": 0, "max_samples_per_domain": 8},
        "checkpoint": {"interval": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    return path


def train_command(launcher: str, nproc: int, config: str, overrides=()) -> list[str]:
    module = ["-m", "megadoremi.train", config, *overrides]
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, *module]
    if launcher == "torchrun":
        return [os.path.join(BIN, "torchrun"), "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
                *module]
    if launcher == "deepspeed":
        return [os.path.join(BIN, "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                "--module", "megadoremi.train", config, *overrides]
    if launcher == "mpiexec":
        return [os.path.join(BIN, "mpiexec"), "-n", str(nproc), sys.executable, *module]
    raise ValueError(launcher)


def clean_env() -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_ID",
                "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        env.pop(key, None)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_training(launcher: str, nproc: int, config: str, overrides=(), timeout_s: int = 300,
                 check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(launcher, nproc, config, overrides), cwd=REPO_ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=timeout_s)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def read_jsonl(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def losses(run_dir: str) -> list[float]:
    return [record["loss"] for record in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]
