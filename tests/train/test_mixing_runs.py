"""A scheduled mixture in real training runs (gloo processes): the sampled domain proportions change at the
scheduled step, the run resumes exactly mid-schedule (before and after the change), and 1 rank x 2 accumulation
steps sees the same global batches as 2 ranks."""

import json
import os

import numpy as np
import pytest

from tests.helpers.launch import read_jsonl, run_training, write_config

DOMAINS = ["stdlib_code", "licenses", "arithmetic", "boilerplate", "random_chars"]
SCHEDULE = {"0": {"stdlib_code": 1, "licenses": 1, "arithmetic": 0, "boilerplate": 0, "random_chars": 0},
            "3": {"stdlib_code": 0, "licenses": 0, "arithmetic": 1, "boilerplate": 1, "random_chars": 2}}
STEPS = ["--train.steps=6", "--train.micro_batch_size=4", "--checkpoint.interval=0"]


@pytest.fixture(scope="module")
def setup(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixing")
    schedule = root / "schedule.json"
    schedule.write_text(json.dumps(SCHEDULE))
    config = write_config(str(root / "config.yaml"), tiny_corpus,
                          mixing={"method": "schedule", "schedule": str(schedule)})
    full = str(root / "full")
    run_training("torchrun", 2, config, [f"--run_dir={full}", *STEPS])
    return {"root": root, "config": config, "full": full}


def samples(run_dir) -> list[list[int]]:
    return [[record["domain_samples"][name] for name in DOMAINS]
            for record in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


def test_proportions_change_at_the_scheduled_step(setup):
    # Global batch 8, stratified draws: exactly the schedule's shares; step 3 (0-based) is the 4th record.
    assert samples(setup["full"]) == [[4, 4, 0, 0, 0]] * 3 + [[0, 0, 2, 2, 4]] * 3
    records = read_jsonl(os.path.join(setup["full"], "metrics.jsonl"))
    assert records[2]["mixing_weights"] == {"stdlib_code": 0.5, "licenses": 0.5, "arithmetic": 0.0,
                                             "boilerplate": 0.0, "random_chars": 0.0}
    assert records[3]["mixing_weights"]["random_chars"] == 0.5
    trajectory = read_jsonl(os.path.join(setup["full"], "mixing_trajectory.jsonl"))
    assert [line["step"] for line in trajectory] == list(range(1, 7))
    assert set(records[0]["domain_loss"]) == {"stdlib_code", "licenses"}
    assert set(records[-1]["domain_loss"]) == {"arithmetic", "boilerplate", "random_chars"}


@pytest.fixture(scope="module")
def interrupted(setup):
    """The run of ``setup`` stopped (checkpoint and exit) after step 2, before the change, and after step 4, after
    it, then finished."""
    run_dir = str(setup["root"] / "interrupted")
    for _ in range(3):
        run_training("torchrun", 2, setup["config"], [f"--run_dir={run_dir}", *STEPS, "--train.exit_interval=2"])
    return run_dir


def test_resume_mid_schedule_is_exact(setup, interrupted):
    run_dir = interrupted
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    full = read_jsonl(os.path.join(setup["full"], "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 7))
    assert samples(run_dir) == samples(setup["full"])
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in full], rtol=0, atol=1e-7)
    final, final_full = (json.load(open(os.path.join(d, "final.json"))) for d in (run_dir, setup["full"]))
    assert final["eval"]["val_loss"] == pytest.approx(final_full["eval"]["val_loss"], abs=1e-7)
    assert len(read_jsonl(os.path.join(run_dir, "mixing_trajectory.jsonl"))) == 6


def test_one_rank_with_accumulation_sees_the_same_batches(setup):
    run_dir = str(setup["root"] / "accum")
    run_training("python", 1, setup["config"], [f"--run_dir={run_dir}", *STEPS, "--train.grad_accum=2"])
    assert samples(run_dir) == samples(setup["full"])
    full = [r["loss"] for r in read_jsonl(os.path.join(setup["full"], "metrics.jsonl"))]
    np.testing.assert_allclose([r["loss"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))], full,
                               rtol=1e-4)


def test_changed_schedule_is_refused_on_resume(setup, interrupted, tmp_path):
    # The finished run resumes from its last checkpoint (step 6) when asked for more steps.
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({**SCHEDULE, "4": SCHEDULE["0"]}))
    result = run_training("python", 1, setup["config"], [f"--run_dir={interrupted}", *STEPS,
                                                         "--train.micro_batch_size=8", "--train.steps=8",
                                                         f"--mixing.schedule={changed}"], check=False)
    assert result.returncode == 2 and "differs from the one the checkpoint was trained with" in result.stderr
