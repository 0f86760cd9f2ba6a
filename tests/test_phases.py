"""A workflow phase's bookkeeping on hand-made files: input fingerprints and the reasons a phase is redone, setting
a stale run aside, running a command with its log, and the exit status and one-line error of a failed phase."""

import json
import os
import sys

import pytest

from megadoremi import phases

# The end of torchrun's output (torch 2.x) when rank 0 exited 3: torchrun itself exits 1.
TORCHRUN_SUMMARY = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
/tmp/train.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-30_08:25:10
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -15 (pid: 30142)
  error_file: <N/A>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_08:25:10
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : {code} (pid: 30141)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_digest_ignores_key_order_and_flatten_names_fields():
    assert phases.digest({"a": 1, "b": [1, 2]}) == phases.digest({"b": (1, 2), "a": 1})
    assert phases.digest({"a": 1.0}) != phases.digest({"a": 1.0000001})
    assert phases.flatten({"train": {"lr": 0.1, "seed": 1}, "data": {"domains": {"web": "p"}, "weights": {}},
                           "run_dir": "r"}) == {"train.lr": 0.1, "train.seed": 1, "data.domains.web": "p",
                                                "data.weights": {}, "run_dir": "r"}


def test_stale_reason_names_the_changed_inputs(tmp_path):
    record = str(tmp_path / "run" / phases.RECORD_NAME)
    inputs = {"train.lr": 0.1, "data.tokenizer_model fingerprint": {"sha256": "aa"}, "shape": (1, 2)}
    assert phases.stale_reason(record, inputs).startswith("no input fingerprint recorded (phase_fingerprint.json")
    phases.write_record(record, inputs)
    assert phases.stale_reason(record, inputs) is None  # the tuple went through JSON as a list: still equal
    changed = {**inputs, "data.tokenizer_model fingerprint": {"sha256": "bb"}, "--nproc": 2}
    assert phases.stale_reason(record, changed) == "inputs changed (--nproc, data.tokenizer_model fingerprint)"
    many = {f"key{i}": i for i in range(6)}
    assert phases.stale_reason(record, many) == "inputs changed (data.tokenizer_model fingerprint, key0, key1, " \
                                                "key2 and 5 more)"  # 6 new, 3 gone
    with open(record, "w") as handle:
        handle.write("{not json")
    assert phases.stale_reason(record, inputs) == f"unreadable input fingerprint ({record})"


def test_filling_an_empty_corpus_file_changes_its_fingerprint(tmp_path):
    path = tmp_path / "wiki.jsonl"
    path.write_text("")
    record = str(tmp_path / "wiki.fingerprint.json")
    phases.write_record(record, phases.corpus_inputs([str(path)]))
    path.write_text('{"text": "now there is text"}\n')
    assert phases.stale_reason(record, phases.corpus_inputs([str(path)])) == "inputs changed (corpus file wiki.jsonl)"


def test_set_aside_keeps_the_old_directory_under_a_new_name(tmp_path):
    run = tmp_path / "reference"
    for _ in range(2):
        run.mkdir()
        (run / "final.json").write_text("{}")
        aside = phases.set_aside(str(run))
        assert os.path.basename(aside).startswith("reference.stale-") and not run.exists()
        assert (tmp_path / os.path.basename(aside) / "final.json").read_text() == "{}"
    assert len(os.listdir(tmp_path)) == 2  # the same second twice: the second name gets a -2


def test_training_inputs_follow_the_files_a_config_names(tmp_path, monkeypatch):
    for name in ("tok.model", "weights.json"):
        (tmp_path / name).write_text(name)
    for suffix in (".bin", ".idx"):
        (tmp_path / f"web_text_document{suffix}").write_bytes(b"data")
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "final.json").write_text('{"status": "completed"}')
    config = {"run_dir": str(tmp_path / "proxy"),
              "data": {"tokenizer_model": str(tmp_path / "tok.model"), "weights": str(tmp_path / "weights.json"),
                       "domains": {"web": str(tmp_path / "web_text_document"), "gone": str(tmp_path / "gone")}},
              "doremi": {"enabled": True, "reference_model": str(reference)}}
    inputs = phases.training_inputs(config, nproc=2)
    assert inputs["--nproc"] == 2 and inputs["data.weights"] == str(tmp_path / "weights.json")
    assert inputs["data.weights fingerprint"] == {"sha256": phases.file_sha256(str(tmp_path / "weights.json"))}
    assert inputs["data.domains.web fingerprint"]["bin_size"] == 4 and inputs["data.domains.gone fingerprint"] is None
    assert inputs["doremi.reference_model fingerprint"]["final.json"] is not None
    record = str(tmp_path / phases.RECORD_NAME)
    phases.write_record(record, inputs)
    (tmp_path / "weights.json").write_text("other weights")  # same path, other content
    (reference / "final.json").write_text('{"status": "completed", "final_loss": 2.0}')  # a retrained reference
    assert phases.stale_reason(record, phases.training_inputs(config, nproc=2)) == \
        "inputs changed (data.weights fingerprint, doremi.reference_model fingerprint)"
    monkeypatch.setattr(phases, "MAX_HASHED_BYTES", 3)  # a big file is known by its size and mtime
    assert phases.file_identity(str(tmp_path / "tok.model"))["size"] == len("tok.model")
    assert phases.file_identity(str(tmp_path / "missing")) is None


def test_run_logged_appends_and_echoes_the_output(tmp_path, capfd):
    log = str(tmp_path / "launch.log")
    command = [sys.executable, "-c", "import sys; print('step 1 loss 3.2', flush=True); sys.exit(3)"]
    for attempt in (1, 2):
        status, output = phases.run_logged(command, dict(os.environ), log)
        assert status == 3 and output == "step 1 loss 3.2\n"  # this attempt's output only
        assert open(log).read() == "step 1 loss 3.2\n" * attempt
    assert capfd.readouterr().err == "step 1 loss 3.2\n" * 2


def test_exit_status_of_a_rank_behind_the_launcher():
    assert phases.phase_exit_status(0, "") == 0
    assert phases.phase_exit_status(3, "") == 3  # python, mpiexec, deepspeed pass a rank's status through
    assert phases.phase_exit_status(1, TORCHRUN_SUMMARY.format(code=3)) == 3
    assert phases.phase_exit_status(1, TORCHRUN_SUMMARY.format(code=2)) == 2  # the root cause, not rank 1's -15
    assert phases.phase_exit_status(1, "=   BAD TERMINATION\n=   EXIT CODE: 3\n") == 3  # MPICH's summary
    assert phases.phase_exit_status(1, "12:00 [rank0] INFO exit code: 3 is divergence\nTraceback ...") == 1


@pytest.mark.parametrize("status, exit_status, words", [
    (3, 3, "diverged: its loss or gradient norm became non-finite (exit status 3); see /w/run/launch.log"),
    (75, 75, "checkpointed and stopped on a signal (exit status 75); rerun the workflow to resume it"),
    (2, 2, "failed (exit status 2); see /w/run/launch.log. Rerunning the workflow resumes it"),
    (-9, 137, "was killed by signal 9; see /w/run/launch.log"),
    (0, 1, "exited without finishing (no final.json; train.exit_interval?)"),
])
def test_phase_failure_is_one_line_with_the_phase_status(status, exit_status, words):
    failure = phases.phase_failure("/w/run", status)
    assert failure.exit_status == exit_status and str(failure).startswith(f"phase /w/run {words}")
    assert "\n" not in str(failure)


def test_a_divergence_is_one_this_attempt_wrote(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    path = str(run / "diverged.json")
    assert phases.new_divergence(str(run), phases.file_version(path)) is None
    with open(path, "w") as handle:
        json.dump({"status": "diverged", "step": 12}, handle)
    before = phases.file_version(path)
    assert phases.new_divergence(str(run), before) is None  # an earlier attempt's
    os.replace(_write(tmp_path / "new.json", '{"step": 40}'), path)
    diverged = phases.new_divergence(str(run), before)
    assert diverged == {"step": 40}
    failure = phases.phase_failure(str(run), 1, diverged)  # torchrun's 1 for a rank's 3
    assert failure.exit_status == 3 and str(failure).startswith(f"phase {run} diverged at step 40:")


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_run_directory_in_use_is_not_set_aside(tmp_path):
    from megadoremi.train.run_lock import RunDirectoryInUse, RunLock

    run_dir = tmp_path / "reference"
    run_dir.mkdir()
    holder = RunLock(str(run_dir))
    holder.acquire()
    with pytest.raises(RunDirectoryInUse, match="in use by another run"):
        phases.set_aside(str(run_dir))
    holder.release()
    assert phases.set_aside(str(run_dir)).startswith(str(run_dir) + ".stale-")
