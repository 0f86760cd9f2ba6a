"""megadoremi-pipeline end to end on a small corpus: phases, rounds, reuse of complete phases, report."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers.launch import REPO_ROOT, clean_env


def pipeline(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "megadoremi.pipeline", *args], cwd=REPO_ROOT, env=clean_env(),
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
    # A rerun reuses every complete phase: nothing is trained again.
    finals = {root: os.path.getmtime(os.path.join(root, "final.json"))
              for root, _, files in os.walk(os.path.join(workdir, "runs")) if "final.json" in files}
    assert len(finals) == 6  # 2 x (reference, proxy) + 2 main models
    again = pipeline(args)
    assert again.returncode == 0
    assert "complete, reusing" in again.stderr
    assert finals == {root: os.path.getmtime(os.path.join(root, "final.json")) for root in finals}
