"""megadoremi-pipeline's phases are reused only while their inputs are unchanged, a failed or diverged phase stops
the workflow with one line, and user-input errors are one line and exit 2.

No training here: the training launch is replaced by a recorder that writes what a finished run writes
(final.json, and domain_weights for a proxy) or fails as asked; the tokenizer and the preprocessing are real, on a
two-domain corpus of a few KB.
"""

import json
import logging
import os
import random

import pytest
import yaml

from megadoremi import demo, phases, workflow
from megadoremi.data.indexed_dataset import IndexedDataset
from megadoremi.data.tokenizer import train_tokenizer

WORDS = ("alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "green", "seven", "light", "house", "under")
VOCAB_SIZE = 320  # the smallest that SentencePiece accepts on this corpus (its byte pieces count)


def write_docs(path, num_docs: int, seed: int, mode: str = "w") -> None:
    rng = random.Random(seed)
    with open(path, mode) as handle:
        for _ in range(num_docs):
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30))}) + "\n")


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    write_docs(root / "news.jsonl", 40, seed=1)
    write_docs(root / "code.jsonl", 40, seed=2)
    return str(root)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer")
    write_docs(root / "text.jsonl", 80, seed=3)
    train_tokenizer([str(root / "text.jsonl")], str(root / "tok"), VOCAB_SIZE, seed=0)
    return str(root / "tok.model")


@pytest.fixture
def log(caplog):
    """The megadoremi logger's records (it does not propagate to the root logger caplog listens on)."""
    logger = logging.getLogger("megadoremi")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="megadoremi")
    yield caplog
    logger.removeHandler(caplog.handler)


class FakeLauncher:
    """Stands in for ``phases.run_logged``: records the phase, then finishes it or fails as told."""

    def __init__(self):
        self.calls: list[str] = []
        self.failures: dict[str, object] = {}  # phase name (round1/reference) -> callable(run_dir) -> status

    def __call__(self, command, env, log_path):
        config_path = next(arg for arg in command if arg.endswith("phase_config.yaml"))
        with open(config_path) as handle:
            config = yaml.safe_load(handle)
        run_dir = config["run_dir"]
        name = "/".join(run_dir.split(os.sep)[-2:])
        self.calls.append(name)
        with open(log_path, "a") as handle:
            handle.write(f"training {name}\n")
        if name in self.failures:
            return self.failures.pop(name)(run_dir), ""
        # A retrained run differs from the one before (its losses would), so what reads it is redone too.
        final = {"status": "completed", "step": config["train"]["steps"], "attempt": len(self.calls)}
        if config.get("doremi", {}).get("enabled"):
            names = list(config["data"]["domains"])
            final["domain_weights"] = {n: (i + 1) / (len(names) * (len(names) + 1) / 2) for i, n in enumerate(names)}
        with open(os.path.join(run_dir, "final.json"), "w") as handle:
            json.dump(final, handle)
        return 0, ""


@pytest.fixture
def launcher(monkeypatch):
    fake = FakeLauncher()
    monkeypatch.setattr(phases, "run_logged", fake)
    return fake


def pipeline_args(corpus, workdir, *extra):
    return ["--corpus", corpus, "--workdir", str(workdir), "--launcher", "python", "--nproc", "1", "--steps", "4",
            "--skip-main", "--workers", "1", "--vocab-size", str(VOCAB_SIZE), *extra]


def messages(log) -> str:
    text = "\n".join(record.getMessage() for record in log.records)
    log.clear()
    return text


def stale_dirs(workdir, run: str) -> list[str]:
    parent, base = os.path.split(os.path.join(str(workdir), "runs", run))
    return sorted(name for name in os.listdir(parent) if name.startswith(base + ".stale-"))


def test_rerun_reuses_every_phase_and_another_tokenizer_redoes_them(corpus, tmp_path, launcher, log):
    workdir = tmp_path / "work"
    assert workflow.main(pipeline_args(corpus, workdir)) == 0
    assert launcher.calls == ["round1/reference", "round1/proxy"]
    for run in ("reference", "proxy"):
        record = json.load(open(workdir / "runs" / "round1" / run / phases.RECORD_NAME))
        assert record["fingerprint"] == phases.digest(record["inputs"])
        assert "data.tokenizer_model fingerprint" in record["inputs"]
    assert os.path.exists(workdir / "tokenizer.fingerprint.json")
    assert os.path.exists(workdir / "data" / "news_text_document.fingerprint.json")
    messages(log)

    # The same inputs: nothing is redone.
    assert workflow.main(pipeline_args(corpus, workdir)) == 0
    assert launcher.calls == ["round1/reference", "round1/proxy"]
    text = messages(log)
    assert "phase tokenizer: complete, reusing" in text and "phase preprocess" not in text
    assert "phase runs/round1/reference: complete, reusing" in text
    assert "phase runs/round1/proxy: complete, reusing" in text

    # Another tokenizer: the data is re-tokenized and both models retrained, the old runs kept aside.
    old_reference = open(workdir / "runs" / "round1" / "reference" / "final.json").read()
    assert workflow.main(pipeline_args(corpus, workdir, "--vocab-size", str(VOCAB_SIZE + 20))) == 0
    assert launcher.calls[2:] == ["round1/reference", "round1/proxy"]
    text = messages(log)
    assert "phase tokenizer: inputs changed (vocab_size), training" in text
    assert "phase preprocess news: inputs changed (tokenizer_model sha256)" in text
    assert "phase preprocess code: inputs changed (tokenizer_model sha256)" in text
    assert "phase runs/round1/reference: inputs changed (data.domains.code fingerprint, data.domains.news " \
           "fingerprint, data.tokenizer_model fingerprint), retraining; the previous run is kept in " \
           "runs/round1/reference.stale-" in text
    assert "phase runs/round1/proxy: inputs changed (" in text  # its datasets, tokenizer and reference changed
    aside = stale_dirs(workdir, "round1/reference")
    assert len(aside) == 1 and len(stale_dirs(workdir, "round1/proxy")) == 1
    assert open(workdir / "runs" / "round1" / aside[0] / "final.json").read() == old_reference


def test_changed_corpus_file_redoes_its_domain_and_the_models(corpus, tmp_path, launcher, log, tokenizer_model):
    workdir = tmp_path / "work"
    args = pipeline_args(corpus, workdir, "--tokenizer-model", tokenizer_model)
    assert workflow.main(args) == 0
    code_dataset = phases.file_stat(str(workdir / "data" / "code_text_document.bin"))
    messages(log)
    write_docs(os.path.join(corpus, "news.jsonl"), 10, seed=4, mode="a")
    assert workflow.main(args) == 0
    text = messages(log)
    assert "phase preprocess news: inputs changed (corpus file news.jsonl)" in text
    assert "phase preprocess code" not in text
    assert phases.file_stat(str(workdir / "data" / "code_text_document.bin")) == code_dataset
    assert "phase runs/round1/reference: inputs changed (data.domains.news fingerprint)" in text
    assert launcher.calls == ["round1/reference", "round1/proxy"] * 2


def test_an_empty_domain_file_filled_later_is_tokenized(corpus, tmp_path, launcher, tokenizer_model, capsys):
    workdir = tmp_path / "work"
    args = pipeline_args(corpus, workdir, "--tokenizer-model", tokenizer_model)
    open(os.path.join(corpus, "wiki.jsonl"), "w").close()
    first = workflow.main(args)  # an empty input file is refused (exit 2, naming it) or gives an empty dataset
    if first != 0:
        assert first == 2 and "wiki.jsonl" in capsys.readouterr().err
    write_docs(os.path.join(corpus, "wiki.jsonl"), 20, seed=5)
    assert workflow.main(args) == 0
    assert len(IndexedDataset(str(workdir / "data" / "wiki_text_document"))) == 20


def test_run_without_fingerprint_is_set_aside_and_retrained(corpus, tmp_path, launcher, log, tokenizer_model):
    workdir = tmp_path / "work"
    args = pipeline_args(corpus, workdir, "--tokenizer-model", tokenizer_model)
    assert workflow.main(args) == 0
    os.remove(workdir / "runs" / "round1" / "reference" / phases.RECORD_NAME)  # as a workdir of an older version
    messages(log)
    assert workflow.main(args) == 0
    text = messages(log)
    assert "phase runs/round1/reference: no input fingerprint recorded" in text
    assert launcher.calls == ["round1/reference", "round1/proxy"] * 2  # the proxy read the old reference
    assert len(stale_dirs(workdir, "round1/reference")) == 1


def test_failed_phase_is_one_line_and_a_rerun_resumes_it_in_place(corpus, tmp_path, launcher, log, tokenizer_model,
                                                                  capsys):
    workdir = tmp_path / "work"
    args = pipeline_args(corpus, workdir, "--tokenizer-model", tokenizer_model)

    def crash(run_dir):
        os.makedirs(os.path.join(run_dir, "checkpoints", "step2"))
        return 1

    launcher.failures["round1/proxy"] = crash
    assert workflow.main(args) == 1
    proxy_dir = str(workdir / "runs" / "round1" / "proxy")
    err = capsys.readouterr().err
    assert err.strip() == (f"megadoremi-pipeline: error: phase {proxy_dir} failed (exit status 1); see "
                           f"{proxy_dir}/launch.log. Rerunning the workflow resumes it from its last checkpoint")
    messages(log)
    assert workflow.main(args) == 0
    assert "phase runs/round1/proxy: unfinished with the same inputs, resuming from its last checkpoint" \
        in messages(log)
    assert launcher.calls == ["round1/reference", "round1/proxy", "round1/proxy"]
    assert os.path.isdir(os.path.join(proxy_dir, "checkpoints", "step2")) and not stale_dirs(workdir, "round1/proxy")
    assert open(os.path.join(proxy_dir, "launch.log")).read() == "training round1/proxy\n" * 2


@pytest.mark.parametrize("status", [3, 1])  # 1: torchrun's status for any failed rank; diverged.json tells
def test_diverged_phase_stops_the_workflow(corpus, tmp_path, launcher, tokenizer_model, capsys, status):
    workdir = tmp_path / "work"

    def diverge(run_dir):
        with open(os.path.join(run_dir, "diverged.json"), "w") as handle:
            json.dump({"status": "diverged", "step": 7, "loss": None, "grad_norm": None}, handle)
        return status

    launcher.failures["round1/reference"] = diverge
    assert workflow.main(pipeline_args(corpus, workdir, "--tokenizer-model", tokenizer_model)) == 3
    assert launcher.calls == ["round1/reference"]  # the proxy was not started
    err = capsys.readouterr().err
    reference = str(workdir / "runs" / "round1" / "reference")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"megadoremi-pipeline: error: phase {reference} diverged at step 7: its loss or gradient "
                          f"norm became non-finite (exit status {status}); see {reference}/diverged.json")
    assert not os.path.exists(workdir / "report.md")


def test_corpus_names_with_whitespace_are_refused_and_ignored_files_listed(tmp_path, log):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("web.jsonl", "code.jsonl.gz", "...jsonl", ".hidden.jsonl", "notes.txt", "web.json"):
        (corpus / name).write_text("")
    (corpus / "sub").mkdir()
    assert workflow.find_domains(str(corpus)) == {"code": [str(corpus / "code.jsonl.gz")],
                                                  "web": [str(corpus / "web.jsonl")]}
    assert f"--corpus {corpus}: ignoring 5 entries not named <domain>.jsonl[.gz] (hidden files, other names, " \
           "folders): ...jsonl, .hidden.jsonl, notes.txt, sub/, web.json" in messages(log)
    (corpus / "my web.jsonl").write_text("")
    with pytest.raises(workflow.WorkflowError, match=r"my web\.jsonl: the domain name 'my web' contains whitespace"):
        workflow.find_domains(str(corpus))


@pytest.mark.parametrize("override, message", [
    ("train.lr", "--set train.lr: expected SECTION.KEY=VALUE"),
    ("train.lr=[1", "--set train.lr=[1: the value is not valid YAML (while parsing a flow sequence"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.lr.peak=1", "--set train.lr.peak=1: lr is not a section"),
    ("train.speed=1", "unknown key train.speed"),
])
def test_bad_override_is_one_line_before_anything_runs(corpus, tmp_path, capsys, override, message):
    workdir = tmp_path / "work"
    assert workflow.main(pipeline_args(corpus, workdir, "--set", override)) == 2
    err = capsys.readouterr().err
    assert err.startswith("megadoremi-pipeline: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(workdir / "tokenizer.model")


def test_debug_shows_the_traceback_of_a_user_error(corpus, tmp_path, capsys):
    assert workflow.main(pipeline_args(corpus, tmp_path / "work", "--set", "train.lr", "--debug")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "WorkflowError" in err


def test_demo_reports_user_errors_in_one_line(corpus, tmp_path, capsys):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    os.rename(corpus, workdir / "corpus")
    assert demo.main(["--workdir", str(workdir), "--set", "train.lr"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "megadoremi-demo: error: --set train.lr: expected SECTION.KEY=VALUE"
