"""The memory planner against DeepSpeed's own estimators and partitioner, the model's saved tensors, and the paper
configs (every YAML under configs/ validates; the 8B layouts give global batch 512 on 64 GPUs)."""

import glob
import io
import json
import os
import re
from contextlib import redirect_stdout

import pytest
import torch

from megadoremi.model.gpt import GPT, Block
from megadoremi.model.presets import PAPER_VOCAB_SIZE, gpt_config_from_preset
from megadoremi.memory_plan import (GIB, Layout, largest_layer_params, layer_activation_bytes, model_state_bytes,
                                 partition_balanced, pipeline_layer_params, plan_memory)
from megadoremi.tools.plan_memory import main as plan_main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPUS_PER_NODE = 8


def _model_states_gib(plan) -> float:
    worst = plan.worst
    return (worst.params_bytes + worst.grads_bytes + worst.optimizer_bytes) / GIB


# --- DeepSpeed's estimators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["280m", "1b", "8b"])
@pytest.mark.parametrize("num_gpus", [8, 16, 64])
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_model_states_agree_with_deepspeed_estimators(preset, num_gpus, zero_stage):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    model = gpt_config_from_preset(preset, PAPER_VOCAB_SIZE)
    plan = plan_memory(model, Layout(num_gpus=num_gpus, zero_stage=zero_stage, micro_batch_size=1))
    nodes = num_gpus // GPUS_PER_NODE
    # Apples to apples: DeepSpeed's per-GPU figure without any offload (params and optimizer on the GPU),
    # parameters created under zero.Init; its CPU figure (per node) has no counterpart on the GPU.
    if zero_stage == 3:
        _, gpu_bytes, largest_layer_bytes = estimate_zero3_model_states_mem_needs(
            plan.num_params, plan.largest_layer_params, num_gpus_per_node=GPUS_PER_NODE, num_nodes=nodes,
            cpu_offload=False, cpu_offload_params=False, zero_init=True)
        assert largest_layer_bytes == 4 * plan.largest_layer_params
    else:
        _, gpu_bytes = estimate_zero2_model_states_mem_needs(
            plan.num_params, num_gpus_per_node=GPUS_PER_NODE, num_nodes=nodes, cpu_offload=False)
    ours = _model_states_gib(plan)
    theirs = gpu_bytes / GIB
    assert abs(ours / theirs - 1) < 0.05, (ours, theirs)


def test_printed_zero3_estimate_matches(capsys):
    """The figure DeepSpeed's all_cold estimator prints for the no-offload row, 8B on 64 GPUs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    model = gpt_config_from_preset("8b", PAPER_VOCAB_SIZE)
    plan = plan_memory(model, Layout(num_gpus=64, zero_stage=3))
    capsys.readouterr()
    estimate_zero3_model_states_mem_needs_all_cold(plan.num_params, plan.largest_layer_params,
                                                   num_gpus_per_node=8, num_nodes=8)
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines()
               if "offload_param=none" in line and "offload_optimizer=none" in line and "zero_init=1" in line)
    per_gpu_gib = float(re.findall(r"([\d.]+)GB", row)[1])
    assert abs(_model_states_gib(plan) - per_gpu_gib) < 0.01


@pytest.mark.parametrize("preset", ["tiny", "70m", "150m", "280m"])
def test_counts_match_deepspeed_model_to_params(preset):
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = gpt_config_from_preset(preset, 50_000 if preset == "280m" else PAPER_VOCAB_SIZE)
    total, largest = model_to_params(GPT(model))
    assert (total, largest) == (model.num_parameters(), largest_layer_params(model))


def test_8b_counts_on_meta_device():
    """DeepSpeed's model_to_params keys on data_ptr (all 0 on meta): the same count by module, 8B at 256k."""
    model = gpt_config_from_preset("8b", PAPER_VOCAB_SIZE)
    with torch.device("meta"):
        gpt = GPT(model)
    assert sum(p.numel() for p in gpt.parameters()) == model.num_parameters() == 9_639_043_072
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in gpt.modules())
    assert largest == largest_layer_params(model) == 256_000 * 4096  # the embedding


@pytest.mark.parametrize("preset,tied,stages", [("8b", True, 2), ("8b", True, 4), ("8b", True, 8),
                                                 ("8b", False, 4), ("280m", True, 4), ("1b", True, 3)])
def test_pipeline_partition_matches_deepspeed(preset, tied, stages):
    from deepspeed.runtime.utils import partition_balanced as deepspeed_partition_balanced

    from megadoremi.model.pipeline import pipeline_layer_specs

    model = gpt_config_from_preset(preset, PAPER_VOCAB_SIZE, tied_embeddings=tied)
    counts = [count for _, count in pipeline_layer_params(model)]
    # The counts are those of the real pipeline layers (built on meta, as DeepSpeed's _count_layer_params does).
    with torch.device("meta"):
        built = [sum(p.numel() for p in spec.build().parameters()) for spec in pipeline_layer_specs(model)]
    assert counts == built
    assert partition_balanced(counts, stages) == deepspeed_partition_balanced(counts, stages)


def test_8b_pipeline_stages_hold_the_embedding_at_both_ends():
    model = gpt_config_from_preset("8b", PAPER_VOCAB_SIZE)
    plan = plan_memory(model, Layout(num_gpus=64, zero_stage=1, pipeline_stages=4, micro_batch_size=2,
                                     grad_accum=16, activation_checkpointing=True))
    assert [stage.num_blocks for stage in plan.stages] == [6, 10, 10, 6]
    assert "embedding" in plan.stages[0].layer_names and "tied_embedding(logits)" in plan.stages[-1].layer_names
    assert [stage.micro_batches_in_flight for stage in plan.stages] == [4, 3, 2, 1]
    assert plan.worst.stage == 3  # the logits
    # ZeRO-1 over the 16 data-parallel replicas of a stage: 16-bit params and grads whole, the rest / 16
    stage = plan.stages[1]
    assert stage.params_bytes == 2 * stage.num_params
    assert stage.grads_bytes == pytest.approx(2 * stage.num_params + 4 * stage.num_params / 16)
    assert stage.optimizer_bytes == pytest.approx(12 * stage.num_params / 16)


def test_model_state_bytes_per_stage_formulas():
    p, dp, largest = 1_000_000, 8, 1000
    assert sum(model_state_bytes(p, dp, 0)) == 20 * p
    assert sum(model_state_bytes(p, dp, 1)) == pytest.approx(4 * p + 16 * p / dp)
    assert sum(model_state_bytes(p, dp, 2)) == pytest.approx(2 * p + 18 * p / dp)
    assert sum(model_state_bytes(p, dp, 3, largest_layer=largest)) == pytest.approx(18 * p / dp + 4 * largest)
    assert sum(model_state_bytes(p, dp, 0, precision="fp32")) == 16 * p


# --- activations against what autograd keeps ------------------------------------------------------------------


def _saved_bytes(module, x) -> int:
    """Bytes of the distinct storages autograd saves in module(x), parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(saved.values())


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_activation_formula_matches_saved_tensors(mlp, dtype):
    seq, batch = 128, 2
    model = gpt_config_from_preset("150m", 1000, seq, mlp=mlp)
    block = Block(model, 1).to(dtype)
    x = torch.randn(batch, seq, model.d_model, dtype=dtype, requires_grad=True)
    measured = _saved_bytes(block, x)  # includes the block input (saved by the first norm)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    predicted = layer_activation_bytes(model, seq, batch, precision, attention="flash")
    assert abs(measured / predicted - 1) < 0.03, (measured, predicted)


def test_activation_checkpointing_and_micro_batch_scaling():
    model = gpt_config_from_preset("8b", PAPER_VOCAB_SIZE)
    base = dict(num_gpus=64, zero_stage=3, seq_length=1024)
    full = plan_memory(model, Layout(micro_batch_size=1, **base)).worst.activations_bytes
    checkpointed = plan_memory(model, Layout(micro_batch_size=1, activation_checkpointing=True, **base))
    s, b, h, vocab = 1024, 1, 4096, 256_000
    logits = s * b * vocab * (2 + 4 + 4)
    layer = s * b * h * (22 + 4 * 24576 / 4096) + 4 * 32 * s * b + 16 * s * b
    assert full == pytest.approx(32 * layer + 4 * s * b * h + logits)
    assert checkpointed.worst.activations_bytes == pytest.approx(32 * 2 * s * b * h + layer + 4 * s * b * h + logits)
    double = plan_memory(model, Layout(micro_batch_size=2, **base)).worst.activations_bytes
    assert double == pytest.approx(2 * full)


# --- the command line -------------------------------------------------------------------------------------


def _run_cli(argv) -> tuple[int, str]:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        status = plan_main(argv)
    return status, buffer.getvalue()


def test_cli_json_prints_exactly_the_seven_keys():
    status, out = _run_cli(["--preset", "8b", "--gpus", "64", "--zero", "3", "--micro-batch", "1",
                            "--activation-checkpointing", "--json"])
    assert status == 0
    summary = json.loads(out)
    assert list(summary) == ["num_params", "largest_layer_params", "params_gb", "grads_gb", "optimizer_gb",
                             "activations_gb", "total_gb"]
    assert summary["num_params"] == 9_639_043_072 and summary["largest_layer_params"] == 1_048_576_000
    parts = summary["params_gb"] + summary["grads_gb"] + summary["optimizer_gb"] + summary["activations_gb"]
    assert summary["total_gb"] == pytest.approx(parts, abs=1e-3)


def test_cli_pipeline_reports_the_worst_stage_and_checks_the_batch():
    status, out = _run_cli(["--preset", "8b", "--gpus", "64", "--zero", "1", "--pipeline", "4", "--micro-batch", "2",
                            "--activation-checkpointing"])
    assert status == 0
    assert "grad_accum 16 x data-parallel 16 = global batch 512 (= target)" in out
    assert out.count("\nstage ") == 4 and "fits" in out


def test_cli_refuses_zero2_with_pipeline_and_missing_preset():
    assert plan_main(["--preset", "8b", "--gpus", "64", "--zero", "2", "--pipeline", "4"]) == 2
    assert plan_main(["--gpus", "8"]) == 2
    assert plan_main(["--preset", "8b", "--gpus", "6", "--pipeline", "4"]) == 2


def test_cli_reports_when_it_does_not_fit():
    status, out = _run_cli(["--preset", "8b", "--gpus", "8", "--zero", "0", "--micro-batch", "1"])
    assert status == 0 and "DOES NOT FIT" in out


# --- configs ------------------------------------------------------------------------------------------------

ALL_CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True))
PAPER = os.path.join(REPO_ROOT, "configs", "paper")


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[os.path.relpath(p, REPO_ROOT) for p in ALL_CONFIGS])
def test_every_config_loads_and_validates(path, monkeypatch):
    from megadoremi.config import load_config
    from megadoremi.distributed.engine import build_ds_config
    from megadoremi.distributed.plan import resolve_batch_plan

    monkeypatch.chdir(REPO_ROOT)  # configs name templates and data relative to the repository root
    config = load_config(path)
    plan = resolve_batch_plan(config.train, config.parallel, config.parallel.pipeline_stages * 2)
    build_ds_config(config.train, config.parallel, plan, cuda=True)  # the template exists, is valid JSON and holds no batch sizes


def test_tiny_and_paper_configs_are_all_found():
    names = {os.path.relpath(p, REPO_ROOT) for p in ALL_CONFIGS}
    assert {"configs/tiny/main.yaml", "configs/paper/reference_280m.yaml", "configs/paper/proxy_280m.yaml",
            "configs/paper/main_8b.yaml", "configs/paper/main_8b_pipeline.yaml"} <= names


# Documented in each YAML's header: grad_accum per GPU count for global batch 512.
LAUNCH_TABLES = {
    "reference_280m.yaml": {8: 8, 16: 4, 32: 2, 64: 1},
    "proxy_280m.yaml": {8: 8, 16: 4, 32: 2, 64: 1},
    "main_8b.yaml": {8: 8, 16: 4, 32: 2, 64: 1},
    "main_8b_pipeline.yaml": {8: 128, 16: 64, 32: 32, 64: 16},
}


@pytest.mark.parametrize("name", sorted(LAUNCH_TABLES))
def test_paper_configs_give_global_batch_512_for_each_documented_gpu_count(name):
    from megadoremi.config import load_config
    from megadoremi.distributed.plan import resolve_batch_plan

    path = os.path.join(PAPER, name)
    text = open(path).read()
    config = load_config(path)
    for gpus, grad_accum in LAUNCH_TABLES[name].items():
        if grad_accum != config.train.grad_accum:
            assert f"--train.grad_accum={grad_accum}" in text  # the header says what to override
        launched = load_config(path, [f"--train.grad_accum={grad_accum}"])
        plan = resolve_batch_plan(launched.train, launched.parallel, gpus)
        assert (plan.global_batch_size, plan.seq_length) == (512, 1024), (gpus, plan)
        model = gpt_config_from_preset(launched.model.preset, PAPER_VOCAB_SIZE)
        layout = Layout(num_gpus=gpus, zero_stage=launched.parallel.zero_stage,
                        pipeline_stages=launched.parallel.pipeline_stages,
                        micro_batch_size=launched.train.micro_batch_size, grad_accum=grad_accum,
                        activation_checkpointing=launched.model.activation_checkpointing)
        assert plan_memory(model, layout).fits(80.0), (name, gpus)


@pytest.mark.parametrize("name", ["main_8b.yaml", "main_8b_pipeline.yaml"])
def test_8b_configs_on_64_gpus(name):
    from megadoremi.config import load_config
    from megadoremi.distributed.plan import resolve_batch_plan

    config = load_config(os.path.join(PAPER, name))
    assert resolve_batch_plan(config.train, config.parallel, 64).global_batch_size == 512
    assert config.model.preset == "8b" and config.model.activation_checkpointing
    assert config.checkpoint.export_model is False
    assert config.data.weights == "runs/paper/proxy_280m/domain_weights.json"
    if name == "main_8b.yaml":
        assert (config.parallel.zero_stage, config.parallel.pipeline_stages) == (3, 1)
        assert config.parallel.ds_config_template == "ds_configs/8b_zero3.json"
    else:
        assert config.parallel.zero_stage == 1 and config.parallel.pipeline_stages == 4
        assert config.parallel.ds_config_template == "ds_configs/8b_pipeline_zero1.json"


def test_paper_hyperparameters_and_shared_domains():
    from megadoremi.config import load_config

    configs = {name: load_config(os.path.join(PAPER, name)) for name in LAUNCH_TABLES}
    for name, config in configs.items():
        train = config.train
        schedule = (train.steps, train.seq_length, train.lr, train.min_lr, train.warmup_fraction, train.decay,
                    train.weight_decay, train.grad_clip)
        assert schedule == (200_000, 1024, 1e-3, 1e-4, 0.06, "exponential", 0.01, 1.0), name
        assert all(prefix.startswith("data/pile/") for prefix in config.data.domains.values()), name
        assert list(config.data.domains) == list(configs["reference_280m.yaml"].data.domains), name
    reference, proxy = configs["reference_280m.yaml"], configs["proxy_280m.yaml"]
    assert reference.model.preset == proxy.model.preset == "280m" and not reference.doremi.enabled
    assert proxy.doremi.enabled and proxy.doremi.reference_model == reference.run_dir
    assert proxy.data.weights == reference.data.weights  # sampled from the reference mixture
    assert configs["main_8b.yaml"].data.weights == os.path.join(proxy.run_dir, "domain_weights.json")
