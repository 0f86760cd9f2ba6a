"""Faults with real processes: a diverged run, a damaged ZeRO-3 checkpoint of another rank, a second run on a
busy run directory, a launcher killed with SIGKILL."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from megadoremi.train.checkpoint import complete_checkpoints
from tests.helpers.launch import REPO_ROOT, clean_env, read_jsonl, run_training, train_command, write_config


@pytest.fixture(scope="module")
def config(tiny_corpus, tmp_path_factory):
    return write_config(str(tmp_path_factory.mktemp("faults") / "config.yaml"), tiny_corpus)


def _strict_jsonl(path: str) -> list[dict]:
    def refuse(name):
        raise AssertionError(f"{path}: bare {name} is not JSON")

    with open(path) as handle:
        return [json.loads(line, parse_constant=refuse) for line in handle if line.strip()]


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if "[megadoremi rank" not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_a_diverged_run_stops_with_status_3_and_keeps_the_last_good_checkpoint(config, tmp_path):
    run_dir = str(tmp_path / "diverged")
    result = run_training("python", 1, config, [f"--run_dir={run_dir}", "--train.steps=60", "--train.lr=1e4",
                                                "--train.min_lr=1", "--train.grad_clip=0",
                                                "--checkpoint.interval=1", "--checkpoint.keep_last=1"], check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    message = _one_line(result.stderr)
    assert message.startswith("megadoremi-train: training diverged: non-finite loss or gradient norm for 3 step(s)")
    assert not os.path.exists(os.path.join(run_dir, "final.json"))
    diverged = json.load(open(os.path.join(run_dir, "diverged.json")))
    records = _strict_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert records[-1]["step"] == diverged["step"] < 60
    first_bad = diverged["step"] - 2  # patience 3: the third non-finite step in a row stops the run
    assert [r["loss"] is None for r in records] == [r["step"] >= first_bad for r in records]  # null, not NaN
    kept = complete_checkpoints(os.path.join(run_dir, "checkpoints"))
    assert [step for step, _ in kept] == [first_bad - 1], (kept, first_bad)  # nothing written after it
    assert diverged["last_checkpoint"] == kept[0][1] and kept[0][1] in message


def test_a_damaged_zero3_partition_of_another_rank_is_named_and_skipped(config, tmp_path):
    run_dir = str(tmp_path / "zero3")
    common = [f"--run_dir={run_dir}", "--parallel.zero_stage=3", "--checkpoint.interval=2",
              "--checkpoint.keep_last=2"]
    run_training("torchrun", 2, config, [*common, "--train.steps=4"])
    newest = os.path.join(run_dir, "checkpoints", "step_00000004")
    partitions = [os.path.join(root, name) for root, _, names in os.walk(newest) for name in names
                  if name.startswith("zero_pp_rank_1_") and "optim_states" in name]
    assert len(partitions) == 1, os.listdir(newest)
    os.truncate(partitions[0], os.path.getsize(partitions[0]) // 2)

    # Asked for explicitly (one process, the checkpoint's ZeRO-3 partitions of 2 ranks): stop, naming the file.
    result = run_training("python", 1, config, [*common, "--train.steps=6", "--resume", "4"], check=False)
    assert result.returncode == 2
    assert f"--resume 4: checkpoint {newest} is damaged: {partitions[0]}" in _one_line(result.stderr)
    # A layout the checkpoint cannot be loaded into: say what the checkpoint is and what the run asked for.
    result = run_training("python", 1, config, [*common, "--train.steps=6", "--parallel.zero_stage=0", "--resume",
                                                "2"], check=False)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "written with ZeRO stage 3, 2 data-parallel x 1 pipeline stage(s) (world 2); this run asks for " \
           "ZeRO stage 0, 1 data-parallel x 1 pipeline stage(s) (world 1)" in line, line

    # --resume auto on 2 ranks: every rank agrees to skip it and resume from the previous complete checkpoint.
    result = run_training("torchrun", 2, config, [*common, "--train.steps=6"])
    assert f"checkpoint {newest} is damaged" in result.stderr and partitions[0] in result.stderr
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', 'step_00000002')} (step 2)" in result.stderr
    assert [r["step"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))] == list(range(1, 7))
    assert "verified step_00000002" in result.stderr  # the cost of verification is reported


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(p) for p in handle.read().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_busy_run_directory_is_refused_and_workers_stop_when_the_launcher_is_killed(config, tmp_path):
    run_dir = str(tmp_path / "busy")
    command = train_command("torchrun", 2, config, [f"--run_dir={run_dir}", "--train.steps=2000"])
    log = tmp_path / "launcher.log"
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                                stderr=open(log, "w"), start_new_session=True)
    try:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        deadline = time.time() + 180
        while time.time() < deadline and launcher.poll() is None:
            if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
                break
            time.sleep(0.1)
        workers = _children(launcher.pid)
        assert len(workers) == 2 and all(_alive(p) for p in workers), workers

        second = run_training("python", 1, config, [f"--run_dir={run_dir}", "--train.steps=3"], check=False)
        assert second.returncode == 2
        line = _one_line(second.stderr)
        match = re.search(r"in use by another run: host (\S+) pid (\d+)", line)
        assert match and int(match.group(2)) in workers, line

        os.kill(launcher.pid, signal.SIGKILL)  # the launcher only: its workers are orphaned
        launcher.wait()
        deadline = time.time() + 120
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "the workers outlived their launcher"
        stderr = log.read_text()
        assert "is gone: stopping" in stderr, stderr[-3000:]
        steps = [step for step, _ in complete_checkpoints(os.path.join(run_dir, "checkpoints"))]
        assert len(steps) == 1 and 2 <= steps[0] < 2000  # they checkpointed before leaving
        assert open(os.path.join(run_dir, "run.lock")).read() == ""  # and released the run directory
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
