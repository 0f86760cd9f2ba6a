"""Loud failures, in process: config numbers, valid JSON, safe loading, the run lock, checkpoint manifests and
layouts, the divergence guard, the launcher watchdog's process chain (real processes: tests/train/test_faults.py)."""

import json
import logging
import math
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from megadoremi.config import ConfigError, config_from_dict
from megadoremi.distributed.watchdog import launcher_chain
from megadoremi.model.io import load_exported_model, safe_torch_load
from megadoremi.train import checkpoint as ckpt
from megadoremi.train.health import DIVERGED_FILE, DivergenceGuard, TrainingDiverged
from megadoremi.train.run_lock import LOCK_FILE, RunDirectoryInUse, RunLock
from megadoremi.utils import jsonio
from megadoremi.utils.cli import UserError

BASE = {"data": {"domains": {"a": "/data/a", "b": "/data/b"}}}


# --- config numbers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling, value", [("3e-4", 3e-4), ("3E-4", 3e-4), ("1e3", 1000.0), ("0.5", 0.5),
                                             (".5", 0.5), ("1_000.5", 1000.5), (" 2e-3 ", 2e-3)])
def test_every_python_float_spelling_is_a_number(spelling, value):
    config = config_from_dict(BASE, [f"--train.lr={spelling}", "--train.min_lr=1e-9"])
    assert config.train.lr == pytest.approx(value)
    config = config_from_dict({**BASE, "train": {"lr": spelling, "min_lr": "1e-9"}})  # as written in a YAML file
    assert config.train.lr == pytest.approx(value)


@pytest.mark.parametrize("override", ["--train.lr=.inf", "--train.lr=inf", "--train.lr=nan", "--train.lr=.nan",
                                      "--train.grad_clip=-.inf", "--doremi.step_size=1e999"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="must be a finite number"):
        config_from_dict(BASE, [override])


def test_a_word_is_still_not_a_number():
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        config_from_dict(BASE, ["--train.lr=fast"])


# --- JSON -----------------------------------------------------------------------------------------------------


def test_json_outputs_never_hold_bare_nan():
    text = jsonio.dumps({"loss": float("nan"), "domain_loss": {"a": float("inf"), "b": 1.5}, "x": [float("-inf")]})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}")) == \
        {"loss": None, "domain_loss": {"a": None, "b": 1.5}, "x": [None]}


# --- safe loading ---------------------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this calls os.system: what a crafted model.pt would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_model_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"config": {}, "state_dict": {}, "payload": _Exploit(str(marker))}, path)
    with pytest.raises(UserError, match=r"model.pt: refused to load: .*arbitrary code"):
        load_exported_model(str(path))
    assert not marker.exists()


def test_plain_files_load_and_foreign_ones_are_named(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(safe_torch_load(str(path))["w"], torch.ones(2))
    with pytest.raises(UserError, match="not a megadoremi model file"):
        load_exported_model(str(path))
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="garbage.pt: cannot read it as a torch file"):
        safe_torch_load(str(tmp_path / "garbage.pt"))
    with pytest.raises(UserError, match="no exported model"):
        load_exported_model(str(tmp_path / "missing"))


def test_rng_state_round_trips_through_json():
    torch.manual_seed(3)
    np.random.seed(3)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    torch.manual_seed(99)
    np.random.seed(99)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert __import__("random").random() == expected[2]


# --- run lock -------------------------------------------------------------------------------------------------


def test_a_held_run_directory_is_refused_with_its_holder(tmp_path):
    first = RunLock(str(tmp_path))
    first.acquire()
    with pytest.raises(RunDirectoryInUse, match=rf"in use by another run: host {socket.gethostname()} pid "
                                                rf"{os.getpid()} "):
        RunLock(str(tmp_path)).acquire()  # flock is per open file: a second open in this process conflicts
    first.release()
    second = RunLock(str(tmp_path))
    second.acquire()  # released cleanly: free, and nothing stale to report
    second.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_a_stale_lock_of_a_dead_process_is_named_and_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": 0}))
    lock = RunLock(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="megadoremi"):
        logging.getLogger("megadoremi").propagate = True
        try:
            lock.acquire()
        finally:
            logging.getLogger("megadoremi").propagate = False
    assert f"stale lock left by host {socket.gethostname()} pid {pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


# --- checkpoint manifests and layouts -------------------------------------------------------------------------


def _fake_checkpoint(root, step: int, layout=None) -> str:
    path = os.path.join(root, ckpt.tag_for_step(step))
    os.makedirs(os.path.join(path, "sub"))
    with open(os.path.join(path, "mp_rank_00_model_states.pt"), "wb") as handle:
        handle.write(os.urandom(5000))
    with open(os.path.join(path, "sub", "zero_pp_rank_1_optim_states.pt"), "wb") as handle:
        handle.write(os.urandom(3000))
    with open(os.path.join(path, ckpt.STATE_FILE), "w") as handle:
        json.dump({"step": step, "layout": layout}, handle)
    manifest = ckpt.build_manifest(path, rank=0, world=1, hashing=True)
    with open(os.path.join(path, ckpt.MANIFEST_FILE), "w") as handle:
        json.dump(manifest, handle)
    with open(os.path.join(path, ckpt.COMPLETE_MARKER), "w") as handle:
        handle.write(f"{step}\n")
    return path


def _damage(path: str, how: str) -> str:
    if how == "random_bytes":
        target = os.path.join(path, "mp_rank_00_model_states.pt")
        with open(target, "r+b") as handle:
            handle.seek(100)
            handle.write(bytes(b ^ 0xFF for b in handle.read(8)))
    elif how == "zeroed":
        target = os.path.join(path, "mp_rank_00_model_states.pt")
        size = os.path.getsize(target)
        with open(target, "wb") as handle:
            handle.write(b"\0" * size)
    elif how == "truncated_state":
        target = os.path.join(path, ckpt.STATE_FILE)
        text = open(target).read()
        with open(target, "w") as handle:
            handle.write(text[: len(text) // 2])
    elif how == "truncated_partition":
        target = os.path.join(path, "sub", "zero_pp_rank_1_optim_states.pt")
        os.truncate(target, 1000)
    elif how == "deleted_partition":
        target = os.path.join(path, "sub", "zero_pp_rank_1_optim_states.pt")
        os.remove(target)
    else:
        raise ValueError(how)
    return target


@pytest.mark.parametrize("how", ["random_bytes", "zeroed", "truncated_state", "truncated_partition",
                                 "deleted_partition"])
def test_damage_after_the_marker_is_found_and_auto_falls_back(tmp_path, how, caplog):
    older = _fake_checkpoint(str(tmp_path), 2)
    newer = _fake_checkpoint(str(tmp_path), 4)
    assert ckpt.verify_checkpoint(newer, 0, 1, hashing=True) == []
    target = _damage(newer, how)
    problems = ckpt.verify_checkpoint(newer, 0, 1, hashing=True)
    assert len(problems) == 1 and problems[0].startswith(target), problems
    with caplog.at_level(logging.ERROR, logger="megadoremi"):
        logging.getLogger("megadoremi").propagate = True
        try:
            assert ckpt.choose_checkpoint("auto", str(tmp_path), 0, 1, hashing=True) == older
        finally:
            logging.getLogger("megadoremi").propagate = False
    assert f"checkpoint {newer} is damaged" in caplog.text and target in caplog.text
    for explicit in ("4", newer):
        with pytest.raises(ckpt.CheckpointError, match=rf"--resume {explicit}: checkpoint {newer} is damaged: "
                                                        rf"{target}"):
            ckpt.choose_checkpoint(explicit, str(tmp_path), 0, 1, hashing=True)


def test_sizes_are_checked_without_hashing_and_hashes_need_it(tmp_path):
    path = _fake_checkpoint(str(tmp_path), 2)
    _damage(path, "random_bytes")  # same size: only the hash sees it
    assert ckpt.verify_checkpoint(path, 0, 1, hashing=False) == []
    assert ckpt.verify_checkpoint(path, 0, 1, hashing=True)
    _damage(path, "truncated_partition")
    assert ckpt.verify_checkpoint(path, 0, 1, hashing=False)


def test_no_sound_checkpoint_starts_afresh_and_a_missing_one_is_named(tmp_path):
    _damage(_fake_checkpoint(str(tmp_path), 2), "zeroed")
    assert ckpt.choose_checkpoint("auto", str(tmp_path), 0, 1, hashing=True) is None
    with pytest.raises(ckpt.CheckpointError, match="--resume 6: .*step_00000006 is not a complete checkpoint"):
        ckpt.choose_checkpoint("6", str(tmp_path), 0, 1, hashing=True)


def test_an_older_checkpoint_without_manifest_is_resumed_unverified(tmp_path):
    path = _fake_checkpoint(str(tmp_path), 2)
    os.remove(os.path.join(path, ckpt.MANIFEST_FILE))
    assert ckpt.choose_checkpoint("auto", str(tmp_path), 0, 1, hashing=True) == path


def test_file_digest_reads_once_and_matches_hashlib(tmp_path):
    data = os.urandom(3 * (8 << 20) + 123)  # several buffers and a partial one
    (tmp_path / "f").write_bytes(data)
    import hashlib

    assert ckpt.file_digest(str(tmp_path / "f")) == (len(data), hashlib.sha256(data).hexdigest())


LAYOUT = {"world_size": 2, "zero_stage": 3, "pipeline_stages": 1, "data_parallel_size": 2}


@pytest.mark.parametrize("current, loadable", [
    (LAYOUT, True),
    ({**LAYOUT, "zero_stage": 0}, False),
    ({**LAYOUT, "world_size": 4, "data_parallel_size": 4}, False),
    ({**LAYOUT, "pipeline_stages": 2, "data_parallel_size": 1}, False),
])
def test_layout_mismatch_says_what_the_checkpoint_is(tmp_path, current, loadable):
    path = _fake_checkpoint(str(tmp_path), 2, layout=LAYOUT)
    if loadable:
        assert ckpt.choose_checkpoint("auto", str(tmp_path), 0, 1, True, current) == path
        return
    with pytest.raises(ckpt.CheckpointError) as raised:
        ckpt.choose_checkpoint("auto", str(tmp_path), 0, 1, True, current)
    message = str(raised.value)
    assert "written with ZeRO stage 3, 2 data-parallel x 1 pipeline stage(s) (world 2)" in message
    assert f"this run asks for ZeRO stage {current['zero_stage']}" in message and "zero_to_fp32" in message


def test_zero_0_checkpoints_load_at_another_data_parallel_size(tmp_path):
    saved = {"world_size": 2, "zero_stage": 0, "pipeline_stages": 1, "data_parallel_size": 2}
    ckpt.check_layout("x", saved, {**saved, "world_size": 1, "data_parallel_size": 1})


# --- divergence guard -----------------------------------------------------------------------------------------


def _record(step, loss):
    return {"step": step, "loss": loss, "domain_loss": {"a": loss, "b": 2.0}}


def test_divergence_needs_patience_steps_in_a_row(tmp_path):
    guard = DivergenceGuard(3, str(tmp_path), rank=0)
    nan = float("nan")
    assert guard.observe(True, _record(5, nan), None, "ck/step_4") is True
    assert guard.observe(False, _record(6, 2.0), 1.0, "ck/step_4") is False  # recovered: the streak restarts
    assert guard.observe(True, _record(7, nan), None, "ck/step_4")
    assert guard.observe(True, _record(8, math.inf), None, "ck/step_4")
    with pytest.raises(TrainingDiverged, match=r"3 step\(s\) in a row, at step 9: loss nan, .*domain losses: a "
                                               r"nan, b 2.*Last checkpoint, written before it: ck/step_4"):
        guard.observe(True, _record(9, nan), None, "ck/step_4")
    written = json.loads((tmp_path / DIVERGED_FILE).read_text())
    assert written["step"] == 9 and written["loss"] is None and written["last_checkpoint"] == "ck/step_4"


def test_a_non_finite_last_step_diverges_at_once(tmp_path):
    with pytest.raises(TrainingDiverged):
        DivergenceGuard(5, str(tmp_path), rank=1).observe(True, _record(10, float("nan")), None, None, True)
    assert not (tmp_path / DIVERGED_FILE).exists()  # only rank 0 writes it


def test_loss_scale_skips_are_not_divergence():
    finite = _record(1, 2.0)
    assert not DivergenceGuard.nonfinite(finite, float("inf"), step_applied=False)  # fp16 overflow: skipped
    assert DivergenceGuard.nonfinite(finite, float("inf"), step_applied=True)
    assert DivergenceGuard.nonfinite(_record(1, float("nan")), 1.0, step_applied=True)
    assert not DivergenceGuard.nonfinite(finite, None, step_applied=True)


# --- launcher chain -------------------------------------------------------------------------------------------


def test_launcher_chain_walks_up_through_launchers_only(tmp_path):
    """A fake two-level DeepSpeed launch (runner -> launch.py -> worker), named by ``exec -a`` as the real ones
    appear on their command lines; the worker finds both, nearest first, and nothing above them."""
    (tmp_path / "worker.py").write_text(
        "import json\nfrom megadoremi.distributed.watchdog import launcher_chain\n"
        "print(json.dumps([command for _, _, command in launcher_chain()]))\n")
    (tmp_path / "launch.py").write_text(
        f"import subprocess, sys\nsys.exit(subprocess.call([{sys.executable!r}, {str(tmp_path / 'worker.py')!r}]))\n")
    launch = f"exec -a 'python -m deepspeed.launcher.launch' {sys.executable} {tmp_path / 'launch.py'}"
    runner = f"bash -c \"({launch}); exit \\$?\""  # a subshell: this bash stays, as the runner
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(["bash", "-c", f"exec -a /venv/bin/deepspeed {runner}"], capture_output=True,
                            text=True, timeout=60, cwd=repo, env={**os.environ, "PYTHONPATH": repo})
    assert result.returncode == 0, result.stderr
    chain = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(chain) == 2, chain
    assert "deepspeed.launcher.launch" in chain[0] and chain[1].startswith("/venv/bin/deepspeed")
    assert launcher_chain() == []  # pytest is not started by a launcher
