"""DoReMi proxy runs with real processes: the alpha trajectory is the same for every layout of the same
global batches (2 ranks x b, 1 rank x 2b, 1 rank x 2 accumulation steps of b, ZeRO-3, 2 pipeline stages), for
cached and live reference losses; resume mid-proxy gives the same weights; bad inputs fail before training."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers.launch import REPO_ROOT, clean_env, free_port, read_jsonl, run_training, write_config

PROXY = ["--train.steps=6", "--doremi.enabled=true", "--doremi.order=lagged", "--doremi.check_consistency=true"]

LAYOUTS = {
    "1rank_micro8": ("python", 1, ["--train.micro_batch_size=8"]),
    "2ranks_micro4": ("torchrun", 2, ["--train.micro_batch_size=4"]),
    "1rank_micro4_accum2": ("python", 1, ["--train.micro_batch_size=4", "--train.grad_accum=2"]),
    "2ranks_micro4_zero3": ("torchrun", 2, ["--train.micro_batch_size=4", "--parallel.zero_stage=3"]),
    "pipeline2_micro4_accum2": ("torchrun", 2, ["--train.micro_batch_size=4", "--train.grad_accum=2",
                                                "--parallel.pipeline_stages=2", "--parallel.zero_stage=1"]),
}


@pytest.fixture(scope="module")
def setup(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("doremi")
    config = write_config(str(root / "config.yaml"), tiny_corpus)
    reference = str(root / "reference")
    run_training("torchrun", 2, config, [f"--run_dir={reference}", "--train.steps=15",
                                         "--train.micro_batch_size=4"])
    return {"root": root, "config": config, "reference": reference}


def trajectory(run_dir):
    records = read_jsonl(os.path.join(run_dir, "doremi_trajectory.jsonl"))
    names = list(records[0]["weights"])
    return np.array([[r["weights"][n] for n in names] for r in records]), names


@pytest.fixture(scope="module")
def layout_runs(setup):
    runs = {}
    for name, (launcher, nproc, overrides) in LAYOUTS.items():
        run_dir = str(setup["root"] / name)
        run_training(launcher, nproc, setup["config"], [f"--run_dir={run_dir}", *PROXY,
                                                          f"--doremi.reference_model={setup['reference']}", *overrides])
        runs[name] = run_dir
    return runs


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "1rank_micro8"])
def test_alpha_trajectory_is_layout_invariant(layout_runs, layout):
    reference, names = trajectory(layout_runs["1rank_micro8"])
    other, other_names = trajectory(layout_runs[layout])
    assert names == other_names and reference.shape == other.shape == (6, len(names))
    np.testing.assert_allclose(other, reference, rtol=0, atol=1e-6)  # ZeRO-3 included (test_equivalence.py)


def test_weights_move_and_outputs_exist(layout_runs):
    run_dir = layout_runs["1rank_micro8"]
    weights, names = trajectory(run_dir)
    assert np.abs(weights[-1] - 1 / len(names)).max() > 1e-3  # the comparison above is not vacuous
    average = json.load(open(os.path.join(run_dir, "domain_weights.json")))
    assert list(average) == names and abs(sum(average.values()) - 1) < 1e-9
    np.testing.assert_allclose([average[n] for n in names], weights.mean(axis=0) / weights.mean(axis=0).sum(),
                               atol=1e-12)
    data_path = open(os.path.join(run_dir, "data_path.txt")).read().split()
    assert len(data_path) == 2 * len(names) and data_path[1].endswith(f"{names[0]}_text_document")
    with open(os.path.join(run_dir, "doremi_weights.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert set(metrics[-1]["doremi_alpha"]) == set(names) and set(metrics[-1]["doremi_excess_loss"]) == set(names)


def test_paper_order_two_ranks_equals_one_rank(setup):
    runs = []
    for launcher, nproc, micro in (("python", 1, 8), ("torchrun", 2, 4)):
        run_dir = str(setup["root"] / f"paper_{nproc}")
        run_training(launcher, nproc, setup["config"], [
            f"--run_dir={run_dir}", "--train.steps=6", "--doremi.enabled=true", "--doremi.order=same_step",
            f"--doremi.reference_model={setup['reference']}", f"--train.micro_batch_size={micro}"])
        runs.append(trajectory(run_dir)[0])
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=1e-6)


def test_cached_reference_losses_equal_live(setup, layout_runs):
    cache = str(setup["root"] / "cache" / "ref_losses")
    subprocess.run([sys.executable, "tools/compute_reference_losses.py", setup["config"], "--output", cache,
                    "--train.steps=6", "--train.micro_batch_size=8",
                    f"--doremi.reference_model={setup['reference']}"],
                   cwd=REPO_ROOT, env=clean_env(), check=True, capture_output=True, timeout=300)
    run_dir = str(setup["root"] / "cached")
    run_training("python", 1, setup["config"], [f"--run_dir={run_dir}", *PROXY, "--train.micro_batch_size=8",
                                                f"--doremi.reference_model={setup['reference']}",
                                                f"--doremi.reference_losses={cache}"])
    np.testing.assert_allclose(trajectory(run_dir)[0], trajectory(layout_runs["1rank_micro8"])[0], rtol=0, atol=1e-6)
    # A cache for another stream is refused, not silently reused.
    result = run_training("python", 1, setup["config"], [
        f"--run_dir={setup['root'] / 'cached_bad'}", *PROXY, "--train.micro_batch_size=8", "--train.seed=99",
        f"--doremi.reference_model={setup['reference']}", f"--doremi.reference_losses={cache}"], check=False)
    assert result.returncode != 0 and "computed for another training stream" in result.stderr


def _compute_cache(setup, output, nproc: int, timeout: int = 300) -> subprocess.CompletedProcess:
    tool = [os.path.join(REPO_ROOT, "tools", "compute_reference_losses.py"), setup["config"], "--output", output,
            "--train.steps=6", "--train.micro_batch_size=8", f"--doremi.reference_model={setup['reference']}",
            "--proxy-world-size=1", "--batch-size=5"]
    launch = [sys.executable] if nproc == 1 else [os.path.join(os.path.dirname(sys.executable), "torchrun"),
                                                   "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    return subprocess.run(launch + tool, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_reference_cache_from_two_ranks_equals_one_rank_and_failures_stop_every_rank(setup, tmp_path):
    one, two = str(tmp_path / "one" / "ref"), str(tmp_path / "two" / "ref")
    for output, nproc in ((one, 1), (two, 2)):
        result = _compute_cache(setup, output, nproc)
        assert result.returncode == 0, result.stderr[-4000:]
    # Rows split 24 / 24 and cut into batches of 5 differently: the same numbers up to GEMM blocking.
    np.testing.assert_allclose(np.load(two + ".npy"), np.load(one + ".npy"), rtol=1e-5, atol=1e-6)
    meta_one, meta_two = json.load(open(one + ".json")), json.load(open(two + ".json"))
    assert meta_one["stream"] == meta_two["stream"] and meta_one["shape"] == [48, 32]
    # Rank 0 cannot create the file (its folder is a regular file): both ranks stop at once with the reason,
    # rank 1 is not left waiting in a barrier, and nothing that looks like a cache is left.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    result = _compute_cache(setup, str(blocker / "ref"), 2, timeout=240)
    assert result.returncode != 0
    assert "NotADirectoryError" in result.stderr or "Not a directory" in result.stderr
    assert "another rank failed while creating the cache file" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["blocker", "one", "two"]


def test_resume_mid_proxy_gives_the_same_weights(setup, layout_runs):
    run_dir = str(setup["root"] / "resumed")
    common = [f"--run_dir={run_dir}", *PROXY, "--train.micro_batch_size=8",
              f"--doremi.reference_model={setup['reference']}"]
    run_training("python", 1, setup["config"], [*common, "--train.exit_interval=3"])
    assert not os.path.exists(os.path.join(run_dir, "domain_weights.json"))
    assert len(read_jsonl(os.path.join(run_dir, "doremi_trajectory.jsonl"))) == 3
    # The same run continued: resumes from step 3's checkpoint, DRO state included.
    run_training("python", 1, setup["config"], [*common, "--resume", "auto"])
    full = layout_runs["1rank_micro8"]
    assert json.load(open(os.path.join(run_dir, "domain_weights.json"))) == pytest.approx(
        json.load(open(os.path.join(full, "domain_weights.json"))), abs=1e-9)
    np.testing.assert_allclose(trajectory(run_dir)[0], trajectory(full)[0], rtol=0, atol=1e-9)


def test_reference_with_another_vocabulary_or_shape_is_refused(setup, tmp_path):
    from megadoremi.model.io import load_exported_model

    config, state = load_exported_model(setup["reference"])
    for field, value, message in (("vocab_size", config.vocab_size + 100, "vocabulary size"),
                                  ("num_layers", config.num_layers + 1, "num_layers")):
        payload = {"config": {**config.__dict__, field: value}, "state_dict": state}
        path = str(tmp_path / f"bad_{field}.pt")
        torch.save(payload, path)
        result = run_training("python", 1, setup["config"], [
            f"--run_dir={tmp_path / field}", *PROXY, f"--doremi.reference_model={path}"], check=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert not os.path.exists(os.path.join(tmp_path, field, "metrics.jsonl"))


def test_weights_file_with_unknown_or_missing_domains_is_refused(setup, tmp_path):
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"stdlib_code": 0.5, "not_a_domain": 0.5}))
    result = run_training("python", 1, setup["config"], [f"--run_dir={tmp_path / 'w'}", f"--data.weights={weights}"],
                          check=False)
    assert result.returncode != 0 and "not_a_domain" in result.stderr
    assert not os.path.exists(str(tmp_path / "w" / "metrics.jsonl"))
