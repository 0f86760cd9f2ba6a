"""tools/bench_train.py: the peak table, and a 3-step tiny run whose JSON
has every field, positive and finite (no wall-time assertions: this machine is shared)."""

import json
import math
import os
import subprocess
import sys

import pytest

from megadoremi.bench.train_bench import format_report, lookup_peak_tflops
from megadoremi.model.flops import flops_per_token
from megadoremi.model.gpt import GPTConfig
from tests.helpers.launch import REPO_ROOT, clean_env

TOOL = os.path.join(REPO_ROOT, "tools", "bench_train.py")


@pytest.mark.parametrize("name, bf16, expected", [
    ("NVIDIA H100 80GB HBM3", True, 989.0),
    ("NVIDIA H100 80GB HBM3", False, 67.0),
    ("NVIDIA H100 PCIe", True, 756.0),
    ("NVIDIA H200", True, 989.0),
    ("NVIDIA A100-SXM4-80GB", True, 312.0),
    ("Tesla V100-SXM2-32GB", True, None),
])
def test_peak_lookup(name, bf16, expected):
    assert lookup_peak_tflops(name, bf16) == expected


def test_tiny_run_reports_every_field():
    command = [sys.executable, TOOL, "--preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
               "--steps", "3", "--warmup-steps", "1", "--block-steps", "2", "--json", "-"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)  # stdout holds only the JSON (DeepSpeed's prints go to stderr)
    positive = ["tokens_per_second", "step_time_s", "mfu", "flops_per_token", "ratio_framework_over_bare",
                "ratio_framework_over_bare_paired", "ratio_framework_over_bare_cpu_time", "peak_tflops_total",
                "achieved_tflops", "measured_gemm_tflops_total", "measured_gemm_tflops_per_cpu_second"]
    for key in positive:
        assert math.isfinite(report[key]) and report[key] > 0, (key, report[key])
    for side in ("framework", "bare"):
        for key in ("tokens_per_second", "step_time_s", "mfu", "cpu_time_s", "mfu_cpu_time"):
            assert math.isfinite(report[side][key]) and report[side][key] > 0, (side, key)
        assert len(report[side]["step_times_s"]) == 3
    for key in ("device", "torch_version", "deepspeed_version", "date", "command", "flops_formula", "peak_source"):
        assert isinstance(report[key], str) and report[key], key
    assert report["flops_per_token"] == flops_per_token(
        GPTConfig(vocab_size=512, num_layers=2, num_heads=4, head_dim=16, d_model=64, ffn_dim=256), 32).total
    assert report["tokens_per_step"] == 64 and report["world_size"] == 1 and report["precision"] == "fp32"
    assert set(report["framework"]["breakdown_s"]) == {"data", "forward_backward_step", "loss_reduce", "log",
                                                       "stop_check"}
    # One rank, fp32, same seed and batches: the bare loop does the framework's arithmetic.
    assert report["loss_max_abs_diff"] < 1e-4
    assert "ratio framework / bare step time" in format_report(report)


def test_proxy_mode_times_plain_live_and_cached_proxy_steps():
    command = [sys.executable, TOOL, "--mode", "proxy", "--preset", "tiny", "--seq-length", "32",
               "--micro-batch-size", "2", "--steps", "3", "--warmup-steps", "1", "--json", "-"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["mode"] == "proxy" and report["proxy_order"] == "same_step"
    for prefix in ("ratio_proxy_live_over_plain", "ratio_proxy_cached_over_plain"):
        for suffix in ("", "_paired", "_cpu_time"):
            assert math.isfinite(report[prefix + suffix]) and report[prefix + suffix] > 0, prefix + suffix
    for side in ("plain", "proxy_live", "proxy_cached"):
        assert len(report[side]["step_times_s"]) == 3
        assert report[side]["mfu"] > 0 and report[side]["tokens_per_second"] > 0
    assert "reference" not in report["plain"]["breakdown_s"]
    # The live proxy really runs a reference model; the cached one only reads rows.
    assert report["proxy_live"]["breakdown_s"]["reference"] > 0
    assert report["proxy_cached"]["breakdown_s"]["reference"] >= 0
    # Live and cached reference feed the proxy the same losses: same trajectory, same alpha.
    assert report["loss_max_abs_diff_live_vs_cached"] < 1e-5
    live, cached = report["final_doremi_alpha"]["proxy_live"], report["final_doremi_alpha"]["proxy_cached"]
    assert len(live) == 3 and abs(sum(live) - 1) < 1e-9
    assert max(abs(a - b) for a, b in zip(live, cached)) < 1e-6
    assert live != [1 / 3] * 3  # alpha moved: the proxy steps ran DoReMi
    text = format_report(report)
    assert "ratio proxy (live) / plain step time" in text and "ratio proxy (cached) / plain step time" in text


def test_mixing_mode_times_static_ado_and_odm_steps():
    command = [sys.executable, TOOL, "--mode", "mixing", "--preset", "tiny", "--seq-length", "32",
               "--micro-batch-size", "2", "--steps", "3", "--warmup-steps", "3", "--json", "-"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["mode"] == "mixing"
    for prefix in ("ratio_ado_over_static", "ratio_odm_over_static"):
        for suffix in ("", "_paired", "_cpu_time"):
            assert math.isfinite(report[prefix + suffix]) and report[prefix + suffix] > 0, prefix + suffix
    for side in ("static", "ado", "odm"):
        assert len(report[side]["step_times_s"]) == 3 and report[side]["tokens_per_second"] > 0
    fit = report["ado_refit_reference_size"]
    assert fit["domains"] == 22 and fit["points"] == 5900 and fit["seconds"] > 0
    assert report["ado_fit_in_run_s"] > 0
    assert report["ratio_ado_over_static_amortised"] > 0
    for name in ("ado", "odm"):  # both policies moved the weights away from the uniform prior
        weights = report["final_mixing_weights"][name]
        assert abs(sum(weights) - 1) < 1e-9 and max(abs(w - 1 / 3) for w in weights) > 1e-4
    assert "ADO refit at the reference's size" in format_report(report)


def test_bad_mode_is_one_clear_error():
    result = subprocess.run([sys.executable, TOOL, "--mode", "fast"], cwd=REPO_ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--mode" in result.stderr


def test_bad_option_is_one_clear_error():
    result = subprocess.run([sys.executable, TOOL, "--steps", "0"], cwd=REPO_ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "bench_train: --steps: must be positive, got 0"
