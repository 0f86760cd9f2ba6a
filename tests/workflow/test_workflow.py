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
            "--micro-batch-size", "4", "--eval-samples", "8", "--split", "90,10,0",
            "--downstream-tasks", "megadoremi_cloze", "--downstream-limit", "2"]
    result = pipeline(args)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(os.path.basename(p).split(".")[0] for p in os.listdir(os.path.join(tiny_corpus["root"], "corpus")))
    evaluation = json.load(open(os.path.join(workdir, "eval.json")))
    assert list(evaluation) == ["baseline", "doremi", "stratified", "downstream"]  # baseline = the reference run
    # lm-eval on the baseline and DoReMi main models: every domain's cloze task and the group, in eval.json and the
    # report, and each run's downstream.json.
    downstream = evaluation.pop("downstream")
    for model in ("baseline", "doremi"):
        assert set(downstream[model]) == {"megadoremi_cloze"} | {f"megadoremi_cloze_{n}" for n in names}, model
        assert 0 <= downstream[model]["megadoremi_cloze"]["acc"] <= 1
    doremi_downstream = json.load(open(os.path.join(workdir, "runs", "main", "doremi", "seed1234", "downstream.json")))
    assert doremi_downstream["tasks"] == downstream["doremi"] and doremi_downstream["limit"] == 2
    assert evaluation["baseline"] == evaluation["stratified"]
    assert sorted(evaluation["baseline"]) == sorted(evaluation["doremi"]) == names
    report = open(os.path.join(workdir, "report.md")).read()
    for needle in ("## Domain weights", "round 2 alpha_bar", "**average**", "**worst**", "## Verdict", "## Speed-up",
                   "## Downstream evaluation", "| megadoremi_cloze | acc |"):
        assert needle in report, needle
    # Round 2's reference mixture is round 1's alpha_bar.
    round1 = json.load(open(os.path.join(workdir, "runs", "round1", "proxy", "domain_weights.json")))
    round2_ref = json.load(open(os.path.join(workdir, "runs", "round2", "alpha_ref.json")))
    assert round2_ref == pytest.approx(round1)
    # The DoReMi main model trained on the last round's weights, the baseline on the uniform mixture.
    main_config = open(os.path.join(workdir, "runs", "main", "doremi", "seed1234", "config.yaml")).read()
    assert os.path.join("round2", "proxy", "domain_weights.json") in main_config
    # Same preset for the main models: the baseline is the round-1 reference run (identical config), not a rerun.
    reference = json.load(open(os.path.join(workdir, "runs", "round1", "reference", "final.json")))
    assert evaluation["baseline"] == reference["eval"]["val_loss"]
    assert not os.path.exists(os.path.join(workdir, "runs", "main", "stratified"))
    assert "not trained twice" in report
    # A rerun reuses every complete phase: nothing is trained again.
    finals = {root: os.path.getmtime(os.path.join(root, "final.json"))
              for root, _, files in os.walk(os.path.join(workdir, "runs")) if "final.json" in files}
    assert len(finals) == 5  # 2 x (reference, proxy) + the DoReMi main model
    again = pipeline(args)
    assert again.returncode == 0
    assert "complete, reusing" in again.stderr
    assert "downstream.json is up to date" in again.stderr  # nor evaluated again
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

    for method in ("stratified", "doremi"):
        config = yaml.safe_load(open(os.path.join(workdir, "runs", "main", method, "seed1234", "config.yaml")))
        assert config["model"]["preset"] == "70m" and config["model"]["mlp"] == "swiglu", method
    reference = yaml.safe_load(open(os.path.join(workdir, "runs", "round1", "reference", "config.yaml")))
    assert reference["model"]["preset"] == "tiny" and reference["model"]["mlp"] == "swiglu"
    baseline = yaml.safe_load(open(os.path.join(workdir, "runs", "main", "stratified", "seed1234", "config.yaml")))
    assert json.load(open(baseline["data"]["weights"])) == pytest.approx({n: 1 / len(reference["data"]["domains"])
                                                                          for n in reference["data"]["domains"]})
    assert "not trained twice" not in open(os.path.join(workdir, "report.md")).read()


def test_python_launcher_with_several_ranks_is_refused(tiny_corpus, tmp_path):
    result = pipeline(["--corpus", os.path.join(tiny_corpus["root"], "corpus"), "--workdir", str(tmp_path / "w"),
                       "--launcher", "python", "--nproc", "2"])
    assert result.returncode == 2 and "--launcher python starts one process" in result.stderr


ONLINE_SHORT = ["--set", "mixing.warmup_steps=2", "--set", "mixing.ado.refit_interval=4", "--set",
                "mixing.ado.ignore_steps=0", "--set", "mixing.ado.fit_stride=1", "--set",
                "mixing.ado.smoothing_window=3", "--set", "mixing.ado.smoothing_order=1", "--set",
                "mixing.ado.min_fit_points=3"]


def test_method_comparison_over_seeds(tiny_corpus, tmp_path):
    import yaml

    workdir = str(tmp_path / "work")
    args = ["--corpus", os.path.join(tiny_corpus["root"], "corpus"), "--workdir", workdir, "--steps", "8",
            "--launcher", "python", "--nproc", "1", "--vocab-size", "400", "--seq-length", "32",
            "--micro-batch-size", "4", "--eval-samples", "8", "--split", "90,10,0",
            "--methods", "stratified,doremi,ado,odm", "--seeds", "2", *ONLINE_SHORT]
    result = pipeline(args)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.load(open(os.path.join(workdir, "eval.json")))
    assert list(evaluation) == ["baseline", "doremi", "stratified", "ado", "odm"]
    assert evaluation["baseline"] == evaluation["stratified"]
    lines = [json.loads(line) for line in open(os.path.join(workdir, "results.jsonl"))]
    assert sorted((line["method"], line["seed"]) for line in lines) == sorted(
        (m, s) for m in ("stratified", "doremi", "ado", "odm") for s in (1234, 1235))
    for line in lines:
        assert line["anchor"] == "stratified" and len(line["val_loss"]) == 5
        assert line["average"] == pytest.approx(sum(line["val_loss"].values()) / 5)
        if line["method"] == "stratified":  # the anchor reaches its own final loss at the last evaluation
            assert line["steps_to_anchor_final_average"] == 8
    # The seed-mean in eval.json is the mean of the two seeds' lines.
    ado = [line for line in lines if line["method"] == "ado"]
    assert evaluation["ado"]["licenses"] == pytest.approx((ado[0]["val_loss"]["licenses"]
                                                           + ado[1]["val_loss"]["licenses"]) / 2)
    # Seed 1234's stratified run is the round-1 reference; seed 1235 is trained. The seeds differ in training only:
    # the validation samples are the same (eval.seed), so the two runs' first evaluations differ only by training.
    assert not os.path.exists(os.path.join(workdir, "runs", "main", "stratified", "seed1234"))
    second = yaml.safe_load(open(os.path.join(workdir, "runs", "main", "stratified", "seed1235", "config.yaml")))
    assert second["train"]["seed"] == 1235 and second["eval"]["seed"] == 1234 and second["eval"]["interval"] == 1
    # mixing.* overrides reach the online methods' main runs only.
    ado_config = yaml.safe_load(open(os.path.join(workdir, "runs", "main", "ado", "seed1235", "config.yaml")))
    assert ado_config["mixing"]["method"] == "ado" and ado_config["mixing"]["ado"]["refit_interval"] == 4
    odm_config = yaml.safe_load(open(os.path.join(workdir, "runs", "main", "odm", "seed1234", "config.yaml")))
    assert odm_config["mixing"]["odm"]["smoothing"] == 0.5 and odm_config["mixing"]["warmup_steps"] == 2
    proxy = yaml.safe_load(open(os.path.join(workdir, "runs", "round1", "proxy", "config.yaml")))
    assert proxy["mixing"]["method"] == "static" and proxy["mixing"]["warmup_steps"] is None
    assert os.path.exists(os.path.join(workdir, "runs", "main", "ado", "seed1234", "mixing_weights.json"))
    report = open(os.path.join(workdir, "report.md")).read()
    for needle in ("## Mixing methods compared (2 seed(s): 1234, 1235)", "| ado |", "| odm |", "verdict",
                   "Final sampling weights", "average - stratified"):
        assert needle in report, needle
    assert os.path.getsize(os.path.join(workdir, "validation_curves.png")) > 0


def test_unknown_method_is_refused(tiny_corpus, tmp_path):
    result = pipeline(["--corpus", os.path.join(tiny_corpus["root"], "corpus"), "--workdir", str(tmp_path / "w"),
                       "--methods", "doremi,greedy"])
    assert result.returncode == 2 and "unknown method(s) ['greedy']" in result.stderr


def test_diverged_reference_stops_the_workflow_with_exit_status_3(tiny_corpus, tmp_path, capsys):
    """The real trainer's side of the contract: a non-finite loss ends the run with status 3 and diverged.json."""
    from megadoremi import workflow

    workdir = tmp_path / "work"
    status = workflow.main([
        "--corpus", os.path.join(tiny_corpus["root"], "corpus"), "--workdir", str(workdir), "--steps", "6",
        "--skip-main", "--launcher", "python", "--nproc", "1", "--tokenizer-model", tiny_corpus["tokenizer_model"],
        "--seq-length", "32", "--micro-batch-size", "4", "--eval-samples", "4", "--split", "90,10,0",
        "--set", "train.lr=1e30", "--set", "train.warmup_fraction=0"])
    reference = workdir / "runs" / "round1" / "reference"
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 3, error
    assert error.startswith(f"megadoremi-pipeline: error: phase {reference} diverged at step ")
    assert json.load(open(reference / "diverged.json"))["status"] == "diverged"
    assert not os.path.exists(reference / "final.json") and not os.path.exists(reference.parent / "proxy")
