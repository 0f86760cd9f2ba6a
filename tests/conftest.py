import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


def venv_executable(name: str) -> str:
    """Path of a console program installed next to the running interpreter (mpiexec, deepspeed, ...)."""
    return os.path.join(VENV_BIN, name)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Demo-corpus domains, a 512-piece tokenizer and one indexed dataset per domain (built once)."""
    from tests.helpers.corpus import build_tiny_corpus

    return build_tiny_corpus(str(tmp_path_factory.mktemp("tiny_corpus")))


@pytest.fixture(scope="session")
def zero3_run(tiny_corpus, tmp_path_factory):
    """A finished 3-step ZeRO-3 run on 2 ranks (model.pt and a checkpoint at step 3), shared by the export and
    downstream-evaluation tests."""
    from tests.helpers.launch import run_training, write_config

    root = tmp_path_factory.mktemp("zero3_run")
    config = write_config(str(root / "config.yaml"), tiny_corpus)
    run_dir = root / "run"
    run_training("torchrun", 2, config, [f"--run_dir={run_dir}", "--train.steps=3", "--checkpoint.interval=3",
                                         "--train.micro_batch_size=2", "--train.grad_accum=2",
                                         "--parallel.zero_stage=3"])
    return run_dir


@pytest.fixture(scope="session")
def pipeline_resume_runs(tiny_corpus, tmp_path_factory):
    """A ZeRO-0 2-stage pipeline run of 6 steps, uninterrupted and stopped after step 3 (train.exit_interval) then
    resumed: {"full": run dir, "resumed": run dir} (the resumed one keeps its step-3 checkpoint)."""
    from tests.helpers.launch import run_training, write_config

    root = tmp_path_factory.mktemp("pipeline_resume")
    config = write_config(str(root / "config.yaml"), tiny_corpus)
    layout = ["--parallel.pipeline_stages=2", "--train.micro_batch_size=2", "--train.grad_accum=2",
              "--train.steps=6", "--train.log_interval=1"]
    full, resumed = root / "full", root / "resumed"
    run_training("torchrun", 2, config, [f"--run_dir={full}", *layout])
    run_training("torchrun", 2, config, [f"--run_dir={resumed}", *layout, "--train.exit_interval=3"])
    assert not os.path.exists(resumed / "final.json")  # it stopped after step 3
    run_training("torchrun", 2, config, [f"--run_dir={resumed}", *layout, "--resume", "auto"])
    return {"full": full, "resumed": resumed}
