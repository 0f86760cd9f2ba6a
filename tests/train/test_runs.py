"""Training runs end to end: loss goes down, exact resume after a hard kill, every launcher, config errors."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from megadoremi.train.checkpoint import COMPLETE_MARKER, CheckpointError, complete_checkpoints, resolve_resume
from tests.helpers.launch import REPO_ROOT, clean_env, losses, read_jsonl, run_training, train_command, write_config


@pytest.fixture(scope="module")
def config(tiny_corpus, tmp_path_factory):
    return write_config(str(tmp_path_factory.mktemp("runs") / "config.yaml"), tiny_corpus)


def test_loss_decreases_and_outputs_are_written(config, tmp_path):
    run_dir = str(tmp_path / "run")
    run_training("torchrun", 2, config, [f"--run_dir={run_dir}", "--train.steps=40", "--eval.interval=20",
                                         "--train.warmup_fraction=0.06"])
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("loss", "lr", "tokens_per_second", "domain_loss"):
        assert key in records[0]
    assert set(records[-1]["domain_loss"]) <= {"stdlib_code", "licenses", "arithmetic", "boilerplate", "random_chars"}
    first, last = np.mean([r["loss"] for r in records[:5]]), np.mean([r["loss"] for r in records[-5:]])
    assert last < first - 0.5, (first, last)
    evals = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    assert [e["step"] for e in evals] == [20, 40]
    assert set(evals[-1]["val_loss"]) == set(evals[-1]["val_ppl"]) and len(evals[-1]["val_loss"]) == 5
    assert evals[-1]["val_loss_avg"] < evals[0]["val_loss_avg"]
    for name in ("config.yaml", "ds_config.json", "final.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    ds_config = json.load(open(os.path.join(run_dir, "ds_config.json")))
    assert ds_config["train_batch_size"] == 8 and ds_config["train_micro_batch_size_per_gpu"] == 4
    events = os.listdir(os.path.join(run_dir, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events), events


def test_exact_resume_after_kill(config, tmp_path):
    steps = ["--train.steps=12", "--checkpoint.interval=4"]
    full = str(tmp_path / "full")
    run_training("torchrun", 2, config, [f"--run_dir={full}", *steps])
    reference = losses(full)

    interrupted = str(tmp_path / "interrupted")
    command = train_command("torchrun", 2, config, [f"--run_dir={interrupted}", *steps, "--train.log_interval=1"])
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    marker = os.path.join(interrupted, "checkpoints", "step_00000004", COMPLETE_MARKER)
    deadline = time.time() + 240
    while not os.path.exists(marker) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert os.path.exists(marker), "the run never wrote its first checkpoint"
    completed = [step for step, _ in complete_checkpoints(os.path.join(interrupted, "checkpoints"))]
    assert completed and completed[-1] < 12, completed

    run_training("torchrun", 2, config, [f"--run_dir={interrupted}", *steps, "--resume", "auto"])
    resumed = read_jsonl(os.path.join(interrupted, "metrics.jsonl"))
    assert [r["step"] for r in resumed] == list(range(1, 13))
    np.testing.assert_allclose([r["loss"] for r in resumed], reference, rtol=0, atol=1e-7)


def test_pipeline_resume_restores_the_tied_embedding(pipeline_resume_runs):
    """DeepSpeed's PipelineModule writes no file for tied layers: without megadoremi's own tied-module file a
    ZeRO-0 pipeline run resumed with its embedding (input and output projection) back at its initial values."""
    import torch

    from megadoremi.model.io import load_exported_model

    full, stopped = pipeline_resume_runs["full"], pipeline_resume_runs["resumed"]
    np.testing.assert_allclose(losses(stopped), losses(full), rtol=0, atol=1e-7)
    (_, resumed), (_, uninterrupted) = load_exported_model(str(stopped)), load_exported_model(str(full))
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-7, msg=name)
    checkpoint = os.path.join(stopped, "checkpoints", "step_00000003")
    assert os.path.exists(os.path.join(checkpoint, "tied_embedding-model_states.pt"))


def test_validation_samples_do_not_depend_on_the_training_seed_or_mixture(config, tmp_path):
    finals = {}
    for name, overrides in (("a", ["--train.seed=1"]),
                            ("b", ["--train.seed=2", "--data.weights={stdlib_code: 3, licenses: 1, arithmetic: 1, "
                                   "boilerplate: 1, random_chars: 1}"]),
                            ("c", ["--train.seed=1", "--eval.seed=5"])):
        run_dir = str(tmp_path / name)
        run_training("python", 1, config, [f"--run_dir={run_dir}", "--train.steps=1", *overrides])
        finals[name] = json.load(open(os.path.join(run_dir, "final.json")))["eval"]
    assert finals["a"]["val_set_hash"] == finals["b"]["val_set_hash"]
    assert finals["a"]["val_samples"] == finals["b"]["val_samples"] == dict.fromkeys(finals["a"]["val_loss"], 8)
    assert finals["c"]["val_set_hash"] != finals["a"]["val_set_hash"]  # another eval.seed: other samples
    assert set(finals["a"]["val_loss_se"]) == set(finals["a"]["val_loss"]) and finals["a"]["val_loss_avg_se"] > 0
    record = read_jsonl(os.path.join(str(tmp_path / "a"), "eval.jsonl"))[-1]
    assert record["val_set_hash"] == finals["a"]["val_set_hash"]


def test_incomplete_checkpoint_is_never_resumed(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_00000004").mkdir(parents=True)
    (checkpoints / "step_00000004" / COMPLETE_MARKER).write_text("4\n")
    (checkpoints / "step_00000008").mkdir()  # interrupted save: files but no marker
    (checkpoints / "step_00000008" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert resolve_resume("auto", str(checkpoints)).endswith("step_00000004")
    assert resolve_resume("none", str(checkpoints)) is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(checkpoints / "step_00000008"), str(checkpoints))


@pytest.fixture(scope="module")
def torchrun_losses(config, tmp_path_factory):
    reference = str(tmp_path_factory.mktemp("torchrun"))
    run_training("torchrun", 2, config, [f"--run_dir={reference}", "--train.steps=3"])
    return losses(reference)


@pytest.mark.parametrize("launcher", ["deepspeed", "mpiexec"])
def test_launchers_form_the_same_group(config, tmp_path, launcher, torchrun_losses):
    """deepspeed and mpiexec give the same 2-rank group as torchrun: same world size, same losses."""
    run_dir = str(tmp_path / launcher)
    result = run_training(launcher, 2, config, [f"--run_dir={run_dir}", "--train.steps=3"])
    assert "world 2 = 1 pipeline x 2 data-parallel" in result.stderr + result.stdout
    plan = json.load(open(os.path.join(run_dir, "ds_config.json")))["megadoremi_batch_plan"]
    assert plan["world_size"] == 2 and plan["data_parallel_size"] == 2
    np.testing.assert_allclose(losses(run_dir), torchrun_losses, rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.stepz=3"], "unknown key train.stepz"),
        (["--train.steps=many"], "train.steps: expected an integer, got 'many'"),
        (["--parallel.zero_stage=3", "--parallel.pipeline_stages=2"], "supports only ZeRO stage 0 or 1"),
        (["--parallel.pipeline_stages=3"], "pipeline_stages=3 does not divide the world size 1"),
        (["--model.preset=13b"], "model.preset: unknown preset '13b'"),
        (["--train.micro_batch_size=0"], "train.micro_batch_size: must be positive"),
        (["--mixing.method=schedule"], "mixing.schedule: required with mixing.method=schedule"),
        (["--mixing.method=greedy"], "mixing.method: must be one of static, schedule, ado, odm, got 'greedy'"),
        (["--mixing.method=odm"], "mixing.odm.smoothing: required with mixing.method=odm"),
        (["--mixing.ado.smoothing_window=100"], "mixing.ado.smoothing_window / smoothing_order: the window must be odd"),
        (["--mixing.method=schedule", "--mixing.schedule=s.json", "--data.weights=w.json"],
         "data.weights with mixing.method=schedule"),
        (["--mixing.method=schedule", "--mixing.schedule=s.json", "--doremi.enabled=true",
          "--doremi.reference_model=ref"], "the DoReMi proxy samples from the fixed reference mixture"),
        (["--doremi.enabled=true", "--doremi.reference_model=ref", "--doremi.order=paper"],
         "'paper' is now called 'same_step'"),
        (["--mixing.method=schedule", "--mixing.schedule=/no/such/schedule.json"],
         "mixing.schedule /no/such/schedule.json: cannot read it"),
    ],
)
def test_config_errors_are_one_clear_message(config, overrides, message, capsys):
    """In process (the command's main, which returns before any process group exists); the real command line in
    the next test."""
    from megadoremi.train.__main__ import main

    saved = dict(os.environ)
    try:
        assert main([config, *overrides]) == 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    stderr = capsys.readouterr().err
    assert message in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("overrides, message", [
    (["--train.stepz=3"], "unknown key train.stepz"),
    (["--train.lr=.inf"], "train.lr: must be a finite number"),
    (["--data.weights=/no/such/weights.json"], "/no/such/weights.json"),
    (["--data.domains={a: /no/such/prefix_text_document, b: /no/such/other}"], "/no/such/prefix_text_document"),
])
def test_config_errors_from_the_command_line(config, overrides, message):
    result = run_training("python", 1, config, overrides, check=False, timeout_s=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dry_run_prints_resolved_config_and_deepspeed_json(config):
    result = run_training("python", 1, config, ["--dry-run", "--train.grad_accum=3", "--parallel.zero_stage=2"],
                          timeout_s=120)
    assert "# resolved config" in result.stdout and "# DeepSpeed config" in result.stdout
    ds_json = json.loads(result.stdout.split("# DeepSpeed config", 1)[1])
    assert ds_json["train_batch_size"] == 12 and ds_json["gradient_accumulation_steps"] == 3
    assert ds_json["zero_optimization"]["stage"] == 2


def test_sigusr1_checkpoints_and_stops_then_resume_finishes(config, tmp_path):
    run_dir = str(tmp_path / "signalled")
    command = train_command("python", 1, config, [f"--run_dir={run_dir}", "--train.steps=400"])
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]  # EXIT_REQUEUE: checkpointed, not finished
    assert "received SIGUSR1" in stderr
    steps = [step for step, _ in complete_checkpoints(os.path.join(run_dir, "checkpoints"))]
    assert len(steps) == 1 and 3 <= steps[0] < 400
    assert not os.path.exists(os.path.join(run_dir, "final.json"))
    run_training("python", 1, config, [f"--run_dir={run_dir}", "--train.steps=400"])
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, 401))
