"""tools/gpu_check.py (``make gpu-check``) in its CPU form, the command ``make gpu-check-cpu`` runs: every part
runs for real (one process, real DeepSpeed engines, bf16 on the CPU accelerator), writes its JSON, passes its
checks; the bf16 path holds what it must (issue 13, item 2). No wall-time assertions."""

import json
import math
import os
import subprocess
import sys

from tests.helpers.launch import REPO_ROOT, clean_env

TOOL = os.path.join(REPO_ROOT, "tools", "gpu_check.py")
PARTS = ("environment", "correctness_bf16", "correctness_doremi", "correctness_zero3", "perf_overhead",
         "perf_checkpointing", "perf_largest_micro_batch", "perf_proxy", "perf_mixing")


def run(out, *extra):
    command = [sys.executable, TOOL, "--device", "cpu", "--preset", "tiny", "--quick", "--out", str(out), *extra]
    return subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=400)


def load(out, name):
    with open(os.path.join(out, name + ".json")) as handle:
        return json.load(handle)


def test_cpu_form_runs_every_part(tmp_path):
    out = tmp_path / "check"
    result = run(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    summary = load(out, "summary")
    assert summary["status"] == "ok" and list(summary["parts"]) == list(PARTS), summary
    assert "gpu-check summary" in result.stdout
    for name in PARTS:
        assert load(out, name)["status"] == "ok", name

    environment = load(out, "environment")
    assert environment["torch"] and environment["deepspeed"] and environment["device_type"] == "cpu"
    assert environment["sdpa"]["kernel"] in ("flash (CPU)", "math")
    assert "aten::scaled_dot_product_attention" in environment["sdpa"]["aten_ops"]

    bf16 = load(out, "correctness_bf16")
    steps = bf16["steps"]
    assert len(bf16["losses_fp32"]) == len(bf16["losses_bf16"]) == steps == 4
    # bf16 is really in use (the losses differ) and within the documented tolerance of fp32.
    assert 0 < bf16["max_rel_diff"] <= bf16["tolerance_rel"]
    assert bf16["bf16_path"] == {"deepspeed_bf16": True, "parameter_dtype": "torch.bfloat16",
                                 "master_weight_dtype": "torch.float32", "optimizer_state_dtype": "torch.float32",
                                 "logits_dtype": "torch.bfloat16", "token_loss_dtype": "torch.float32",
                                 "domain_stats_dtype": "torch.float64"}
    assert bf16["fp32_path"]["parameter_dtype"] == "torch.float32" and not bf16["fp32_path"]["deepspeed_bf16"]

    doremi = load(out, "correctness_doremi")
    assert len(doremi["alpha_fp32"]) == len(doremi["alpha_bf16"]) == steps
    assert all(math.isclose(sum(alpha), 1.0, rel_tol=1e-9) for alpha in doremi["alpha_bf16"])
    assert 0 < doremi["max_abs_diff"] <= doremi["tolerance_abs"] and doremi["dro_weights_dtype"] == "numpy.float64"

    zero3 = load(out, "correctness_zero3")
    assert zero3["fp32"]["max_rel_diff"] <= 1e-4 and zero3["bf16"]["ok"]
    assert zero3["bf16"]["zero3_path"]["master_weight_dtype"] == "torch.float32"

    for name, side in (("perf_overhead", None), ("perf_checkpointing", None), ("perf_largest_micro_batch", None),
                       ("perf_proxy", "plain"), ("perf_mixing", "static")):
        part = load(out, name)
        assert part["preset"] == "tiny" and part["vocab_size"] == 512 and part["peak_tflops_total"] > 0, name
        figures = part[side] if side else part
        assert figures["tokens_per_second"] > 0 and figures["mfu"] > 0, name
    assert load(out, "perf_checkpointing")["activation_checkpointing"] is True
    largest = load(out, "perf_largest_micro_batch")
    assert largest["micro_batch_size"] == largest["chosen_micro_batch"] >= 2
    assert largest["planned_gib_chosen"] <= largest["device_memory_gib"]
    assert load(out, "perf_overhead")["ratio_framework_over_bare"] > 0
    assert load(out, "perf_proxy")["ratio_proxy_live_over_plain"] > 0
    assert load(out, "perf_mixing")["ratio_ado_over_static"] > 0


def test_parts_past_the_time_limit_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "check"
    result = run(out, "--time-limit-s", "0")
    assert result.returncode == 1, result.stderr[-4000:]
    summary = load(out, "summary")
    assert summary["status"] == "fail" and list(summary["parts"]) == list(PARTS)
    for name in PARTS:
        part = load(out, name)
        assert part["status"] == "skipped" and "--time-limit-s" in part["reason"], name


def test_bad_options_exit_2(tmp_path):
    result = run(tmp_path / "check", "--peak-tflops", "0")
    assert result.returncode == 2 and "--peak-tflops" in result.stderr
    command = [sys.executable, TOOL, "--device", "cpu", "--preset", "huge", "--out", str(tmp_path / "check")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=100)
    assert result.returncode == 2 and "unknown preset 'huge'" in result.stderr
