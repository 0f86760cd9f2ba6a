"""Downstream evaluation (issue 12): the per-domain cloze tasks made from held-out documents, and
lm-evaluation-harness run for real (its Python API, the hf model) on a trained run's export, writing
downstream.json; the report's downstream table on hand-made results."""

import json
import os

import pytest

from megadoremi import compare
from megadoremi.tools.make_eval_tasks import cloze, make_eval_tasks, run_config_data
from megadoremi.utils.cli import UserError


def test_cloze_cuts_the_last_word():
    item = cloze("the cat sat on the mat  \n", 1000)
    assert item == {"context": "the cat sat on the", "target": " mat"}
    code = cloze("def f(x):\n    return x\n", 1000)
    assert code["context"] + code["target"] == "def f(x):\n    return x" and code["target"] == " x"
    line = cloze("first line\nlast", 1000)
    assert line == {"context": "first line", "target": "\nlast"}
    assert cloze("single", 1000) is None and cloze("   ", 1000) is None
    long = cloze("aaa bbb ccc ddd eee", 9)  # the context keeps its end, cut at whitespace
    assert long == {"context": "ccc ddd", "target": " eee"}


@pytest.fixture
def trained_run(zero3_run):
    return zero3_run


def test_tasks_come_from_held_out_documents(trained_run, tmp_path):
    from megadoremi.data.blending import domain_document_range
    from megadoremi.data.indexed_dataset import IndexedDataset

    domains, split, tokenizer_model = run_config_data(str(trained_run))
    written = make_eval_tasks(domains, split, tokenizer_model, str(tmp_path), max_docs=5)
    assert set(written) == set(domains)
    for domain, item in written.items():
        start, end = domain_document_range(IndexedDataset(domains[domain]), split, 1)
        records = [json.loads(line) for line in open(item["file"])]
        assert 1 <= len(records) == item["documents"] <= 5
        assert all(start <= record["document"] < end for record in records)  # never a training document
        assert all(record["context"].strip() and record["target"][1:].strip() for record in records)
    group = open(tmp_path / "megadoremi_cloze.yaml").read()
    assert all(item["task"] in group for item in written.values())
    with pytest.raises(UserError, match="holds out no documents"):
        make_eval_tasks(domains, "100,0,0", tokenizer_model, str(tmp_path / "none"))
    with pytest.raises(UserError, match="give the same task name 'megadoremi_cloze_a_b'"):
        make_eval_tasks({"a-b": "x", "a_b": "y"}, split, tokenizer_model, str(tmp_path / "clash"))
    assert 'target_delimiter: ""' in open(written[next(iter(written))]["file"][:-len(".jsonl")] + ".yaml").read()


def test_lm_eval_runs_on_the_exported_model_and_writes_downstream_json(trained_run):
    from megadoremi.tools.evaluate import DOWNSTREAM_FILE, cached_export, evaluate_downstream

    summary = evaluate_downstream(str(trained_run), ["megadoremi_cloze"], limit=4, batch_size=4, device="cpu")
    with open(trained_run / DOWNSTREAM_FILE) as handle:
        assert json.load(handle) == json.loads(json.dumps(summary))
    domains = run_config_data(str(trained_run))[0]
    tasks = summary["tasks"]
    assert set(tasks) == {"megadoremi_cloze"} | {f"megadoremi_cloze_{domain}" for domain in domains}
    for domain in domains:
        metrics = tasks[f"megadoremi_cloze_{domain}"]
        assert 0 <= metrics["acc"] <= 1 and metrics["perplexity"] > 1
        assert summary["samples"][f"megadoremi_cloze_{domain}"] == 4
    assert 0 <= tasks["megadoremi_cloze"]["acc"] <= 1
    # The export is cached: the same directory, not written again while model.pt is unchanged.
    stamp = trained_run / "hf" / "megadoremi_export.json"
    before = os.path.getmtime(stamp)
    assert cached_export(str(trained_run)) == str(trained_run / "hf") and os.path.getmtime(stamp) == before
    with pytest.raises(UserError, match="unknown to lm-eval: megadoremi_cloze_no_such_domain"):
        evaluate_downstream(str(trained_run), ["megadoremi_cloze_no_such_domain"], limit=1)


def test_report_downstream_table():
    downstream = {"baseline": {"megadoremi_cloze": {"acc": 0.25, "acc_stderr": 0.05, "sample_len": 8}},
                  "doremi": {"megadoremi_cloze": {"acc": 0.375, "acc_stderr": 0.06, "sample_len": 8}}}
    text = "\n".join(compare.render_downstream(downstream))
    assert "| megadoremi_cloze | acc | 0.25 (SE 0.05) | 0.375 | +0.125 |" in text
    assert "sample_len" not in text
