"""The DoReMi workflow (megadoremi-pipeline) end to end on a small corpus: phases, rounds, reuse of complete phases, report."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.launch import REPO_ROOT, clean_env


def pipeline(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "megadoremi.workflow", *args], cwd=REPO_ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=600, **kwargs)


def test_corpus_with_one_domain_is_refused_before_anything_runs(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "web.jsonl").write_text('{"text": "hello"}\n')
    result = pipeline(["--corpus", str(corpus), "--workdir", str(tmp_path / "work")])
    assert result.returncode == 2
    assert "needs at least two domains" in result.stderr and "web" in result.stderr
    assert not os.path.exists(tmp_path / "work" / "tokenizer.model")


def test_pipeline_rounds_report_and_reuse(tiny_corpus, tmp_path):
    workdir = str(tmp_path / "work")
    args = ["--corpus", os.path.join(tiny_corpus["root"], "corpus"), "--workdir", workdir, "--steps", "6",
            "--rounds", "2", "--launcher", "python", "--nproc", "1", "--vocab-size", "400", "--seq-length", "32",
            "--micro-batch-size", "4", "--eval-samples", "8", "--split", "90,10,0"]
    result = pipeline(args)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(os.path.basename(p).split(".")[0] for p in os.listdir(os.path.join(tiny_corpus["root"], "corpus")))
    evaluation = json.load(open(os.path.join(workdir, "eval.json")))
    assert set(evaluation) == {"baseline", "doremi"}
    assert sorted(evaluation["baseline"]) == sorted(evaluation["doremi"]) == names
    report = open(os.path.join(workdir, "report.md")).read()
    for needle in ("## Domain weights", "round 2 alpha_bar", "**average**", "**worst**", "## Verdict"):
        assert needle in report, needle
    # Round 2's reference mixture is round 1's alpha_bar.
    round1 = json.load(open(os.path.join(workdir, "runs", "round1", "proxy", "domain_weights.json")))
    round2_ref = json.load(open(os.path.join(workdir, "runs", "round2", "alpha_ref.json")))
    assert round2_ref == pytest.approx(round1)
    # The DoReMi main model trained on the last round's weights, the baseline on the uniform mixture.
    main_config = open(os.path.join(workdir, "runs", "main_doremi", "config.yaml")).read()
    assert os.path.join("round2", "proxy", "domain_weights.json") in main_config
    # Same preset for the main models: the baseline is the round-1 reference run (identical config), not a rerun.
    reference = json.load(open(os.path.join(workdir, "runs", "round1", "reference", "final.json")))
    assert evaluation["baseline"] == reference["eval"]["val_loss"]
    assert not os.path.exists(os.path.join(workdir, "runs", "main_baseline"))
    assert "not trained twice" in report
    # A rerun reuses every complete phase: nothing is trained again.
    finals = {root: os.path.getmtime(os.path.join(root, "final.json"))
              for root, _, files in os.walk(os.path.join(workdir, "runs")) if "final.json" in files}
    assert len(finals) == 5  # 2 x (reference, proxy) + the DoReMi main model
    again = pipeline(args)
    assert again.returncode == 0
    assert "complete, reusing" in again.stderr
    assert finals == {root: os.path.getmtime(os.path.join(root, "final.json")) for root in finals}


def test_main_preset_trains_a_separate_baseline_and_keeps_model_overrides(tiny_corpus, tmp_path):
    workdir = str(tmp_path / "work")
    args = ["--corpus", os.path.join(tiny_corpus["root"], "corpus"), "--workdir", workdir, "--steps", "4",
            "--launcher", "python", "--nproc", "1", "--vocab-size", "400", "--seq-length", "32",
            "--micro-batch-size", "4", "--eval-samples", "8", "--split", "90,10,0", "--main-preset", "70m",
            "--set", "model.mlp=swiglu"]
    result = pipeline(args)
    assert result.returncode == 0, result.stderr[-3000:]
    import yaml

    for run in ("main_baseline", "main_doremi"):
        config = yaml.safe_load(open(os.path.join(workdir, "runs", run, "config.yaml")))
        assert config["model"]["preset"] == "70m" and config["model"]["mlp"] == "swiglu", run
    reference = yaml.safe_load(open(os.path.join(workdir, "runs", "round1", "reference", "config.yaml")))
    assert reference["model"]["preset"] == "tiny" and reference["model"]["mlp"] == "swiglu"
    baseline = yaml.safe_load(open(os.path.join(workdir, "runs", "main_baseline", "config.yaml")))
    assert json.load(open(baseline["data"]["weights"])) == pytest.approx({n: 1 / len(reference["data"]["domains"])
                                                                          for n in reference["data"]["domains"]})
    assert "not trained twice" not in open(os.path.join(workdir, "report.md")).read()


def test_python_launcher_with_several_ranks_is_refused(tiny_corpus, tmp_path):
    result = pipeline(["--corpus", os.path.join(tiny_corpus["root"], "corpus"), "--workdir", str(tmp_path / "w"),
                       "--launcher", "python", "--nproc", "2"])
    assert result.returncode == 2 and "--launcher python starts one process" in result.stderr
