"""Per-GPU memory of a training layout (parameters, gradients, optimizer states, activations) and whether it fits.

    python tools/plan_memory.py --preset 8b --gpus 64 --zero 3 --micro-batch 1 --activation-checkpointing
    python tools/plan_memory.py --preset 8b --gpus 64 --zero 1 --pipeline 4 --micro-batch 2 --json
    python tools/plan_memory.py --config configs/paper/main_8b.yaml --gpus 64     # the layout a YAML asks for

``--config`` takes preset, sequence length, micro-batch, accumulation, ZeRO stage, pipeline stages, activation
checkpointing and precision from an experiment YAML; explicit flags win. The batch line shows the global batch
``micro x grad_accum x (GPUs / pipeline)`` against ``--global-batch-size`` (the paper's 512), and without a
``--grad-accum`` the accumulation that reaches it. ``--json`` prints exactly ``num_params``,
``largest_layer_params``, ``params_gb``, ``grads_gb``, ``optimizer_gb``, ``activations_gb``, ``total_gb``
(GiB per GPU, the most loaded pipeline stage). The formulas are in ``megadoremi.memory_plan``.
Exit status: 0 (whether or not it fits; the human output says), 2 on a usage or configuration error (one line
naming the flag, field or file; ``--debug`` adds the traceback).
"""

import argparse
import json
import sys

from megadoremi.memory_plan import ATTENTION_KINDS, GIB, HEADROOM_FRACTION, PRECISIONS, Layout, MemoryPlan, plan_memory
from megadoremi.utils.cli import UserError, run_cli

PAPER_GLOBAL_BATCH = 512
DEFAULTS = {"preset": None, "zero": 0, "micro_batch": 1, "pipeline": 1, "grad_accum": None, "seq_length": 1024,
            "vocab_size": 256_000, "precision": "bf16", "activation_checkpointing": False}


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (defaults None so that --config values can fill what is not given)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML to take the layout from (flags below override it)")
    parser.add_argument("--preset", help="model preset (tiny, 70m, 150m, 280m, 510m, 760m, 1b, 8b)")
    parser.add_argument("--gpus", type=int, required=True, help="world size (all GPUs of the job)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default 0)")
    parser.add_argument("--micro-batch", type=int, help="sequences per GPU per micro-batch (default 1)")
    parser.add_argument("--pipeline", type=int, help="pipeline stages (default 1)")
    parser.add_argument("--grad-accum", type=int,
                        help="micro-batches per step (default: what reaches --global-batch-size)")
    parser.add_argument("--global-batch-size", type=int, default=PAPER_GLOBAL_BATCH,
                        help="target sequences per optimizer step (default: the paper's %(default)s)")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute every block in the backward (default off)")
    parser.add_argument("--seq-length", type=int, help="tokens per sequence (default 1024)")
    parser.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (default 256000, the paper's)")
    parser.add_argument("--precision", choices=PRECISIONS, help="bf16 (default), fp16 or fp32")
    parser.add_argument("--attention", choices=ATTENTION_KINDS, default="flash",
                        help="flash: SDPA's fused kernels, no seq^2 term (default); math: scores materialised")
    parser.add_argument("--device-memory-gb", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="for --check-deepspeed's node count (default 8)")
    parser.add_argument("--check-deepspeed", action="store_true",
                        help="also print DeepSpeed's own ZeRO-2/3 model-state estimate (imports deepspeed)")
    parser.add_argument("--json", action="store_true", help="print the seven numbers as JSON")
    return parser


def _settings_from_config(path: str) -> dict:
    """Planner settings from an experiment YAML (validated by load_config)."""
    from megadoremi.config import load_config

    config = load_config(path)
    model, train, parallel = config.model, config.train, config.parallel
    return {
        "preset": model.preset, "vocab_size": model.vocab_size, "seq_length": train.seq_length,
        "micro_batch": train.micro_batch_size, "grad_accum": train.grad_accum, "zero": parallel.zero_stage,
        "pipeline": parallel.pipeline_stages, "activation_checkpointing": model.activation_checkpointing,
        "precision": "bf16" if train.precision == "auto" else train.precision,
        "model_overrides": {k: v for k, v in (("mlp", model.mlp), ("norm", model.norm),
                                              ("tied_embeddings", model.tied_embeddings)) if v is not None},
    }


def resolve_settings(args: argparse.Namespace) -> dict:
    """Flags over --config values over DEFAULTS; fills grad_accum from the target global batch when unset."""
    settings = dict(DEFAULTS, model_overrides={})
    if args.config:
        settings.update({k: v for k, v in _settings_from_config(args.config).items() if v is not None})
    for key in DEFAULTS:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if not settings["preset"]:
        raise ValueError("--preset (or --config) is required")
    if settings["pipeline"] < 1 or args.gpus % settings["pipeline"]:
        raise ValueError(f"--pipeline {settings['pipeline']} does not divide --gpus {args.gpus}")
    if settings["grad_accum"] is None:
        per_step = settings["micro_batch"] * (args.gpus // settings["pipeline"])
        if args.global_batch_size % per_step == 0:
            settings["grad_accum"] = args.global_batch_size // per_step
    return settings


def deepspeed_model_state_gib(num_params: int, largest_layer_params: int, num_gpus: int, zero_stage: int,
                              gpus_per_node: int) -> float | None:
    """DeepSpeed's own per-GPU model-state estimate (no offload, zero.Init), GiB; None outside ZeRO-2/3."""
    nodes, per_node = (num_gpus // gpus_per_node, gpus_per_node) if num_gpus % gpus_per_node == 0 else (1, num_gpus)
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
            num_params, largest_layer_params, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=False,
            cpu_offload_params=False, zero_init=True)
    elif zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu_bytes = estimate_zero2_model_states_mem_needs(num_params, num_gpus_per_node=per_node,
                                                             num_nodes=nodes, cpu_offload=False)
    else:
        return None
    return gpu_bytes / GIB


def format_report(plan: MemoryPlan, settings: dict, args: argparse.Namespace) -> str:
    """The human-readable report: model, layout, batch, per-stage table, verdict."""
    model, layout, worst = plan.model, plan.layout, plan.worst
    embedding = model.padded_vocab_size * model.d_model
    lines = [
        f"model {settings['preset']}: {plan.num_params:,} parameters ({model.num_parameters(embedding=False):,} "
        f"non-embedding); largest layer {plan.largest_layer_params:,} parameters"
        f"{' (the embedding, padded vocab x d_model)' if plan.largest_layer_params == embedding else ''}; "
        f"vocab {model.vocab_size} (padded {model.padded_vocab_size}); seq {layout.seq_length}",
        f"layout: {layout.num_gpus} GPUs = {layout.pipeline_stages} pipeline stage(s) x {layout.data_parallel_size} "
        f"data-parallel | ZeRO-{layout.zero_stage} | micro-batch {layout.micro_batch_size} | {layout.precision} | "
        f"activation checkpointing {'on' if layout.activation_checkpointing else 'off'} | attention {layout.attention}",
    ]
    if layout.grad_accum is not None:
        global_batch = layout.micro_batch_size * layout.grad_accum * layout.data_parallel_size
        verdict = "= target" if global_batch == args.global_batch_size else f"!= target {args.global_batch_size}"
        lines.append(f"batch: micro {layout.micro_batch_size} x grad_accum {layout.grad_accum} x data-parallel "
                     f"{layout.data_parallel_size} = global batch {global_batch} ({verdict}); "
                     f"{global_batch * layout.seq_length:,} tokens per step")
    else:
        lines.append(f"batch: no integer grad_accum gives global batch {args.global_batch_size} with micro "
                     f"{layout.micro_batch_size} x data-parallel {layout.data_parallel_size}; pass --grad-accum "
                     f"(pipeline in-flight micro-batches assumed = stages)")
    columns = ("params", 9), ("grads", 9), ("optimizer", 11), ("activations", 13), ("total", 9)
    lines.append(f"{'GiB per GPU':<11}" + "".join(f"{name:>{width}}" for name, width in columns) + "   layers")
    for stage in plan.stages:
        names = stage.layer_names
        blocks = [n for n in names if n.startswith("block")]
        others = [n for n in names if not n.startswith("block")]
        span = (f"blocks {blocks[0][5:]}-{blocks[-1][5:]}" if blocks else "no blocks") + \
            (f" + {', '.join(others)}" if others else "")
        if layout.pipeline_stages == 1:
            span = f"all {model.num_layers} blocks + embedding + head"
        lines.append(f"{'stage ' + str(stage.stage):<11}{stage.params_bytes / GIB:9.2f}"
                     f"{stage.grads_bytes / GIB:9.2f}"
                     f"{stage.optimizer_bytes / GIB:11.2f}{stage.activations_bytes / GIB:13.2f}"
                     f"{stage.total_bytes / GIB:9.2f}   {span}; {stage.num_params / 1e9:.3f}B params, "
                     f"{stage.micro_batches_in_flight} micro-batch(es) in flight")
    usable = args.device_memory_gb * (1 - HEADROOM_FRACTION)
    fits = plan.fits(args.device_memory_gb)
    lines.append(f"per GPU (most loaded stage {worst.stage}): {worst.total_bytes / GIB:.2f} GiB of "
                 f"{args.device_memory_gb:g} GiB ({usable:.1f} GiB after {HEADROOM_FRACTION:.0%} headroom for "
                 f"CUDA context, communication buffers, fragmentation) -> {'fits' if fits else 'DOES NOT FIT'}")
    if args.check_deepspeed:
        model_states = (worst.params_bytes + worst.grads_bytes + worst.optimizer_bytes) / GIB
        reference = None
        if layout.pipeline_stages == 1:
            reference = deepspeed_model_state_gib(plan.num_params, plan.largest_layer_params, layout.num_gpus,
                                                  layout.zero_stage, args.gpus_per_node)
        if reference is None:
            lines.append("DeepSpeed estimator: only for ZeRO-2/3 without pipeline stages")
        else:
            lines.append(f"model states {model_states:.2f} GiB; DeepSpeed's estimator {reference:.2f} GiB "
                         f"({(model_states / reference - 1) * 100:+.1f}%)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Parse, plan, print; 0 on success, 2 on a usage or configuration error."""
    return run_cli("plan_memory", _main, argv)


def _main(argv) -> int:
    from megadoremi.model.presets import gpt_config_from_preset

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = resolve_settings(args)
        model = gpt_config_from_preset(settings["preset"], settings["vocab_size"], settings["seq_length"],
                                       **settings["model_overrides"])
        layout = Layout(num_gpus=args.gpus, zero_stage=settings["zero"], pipeline_stages=settings["pipeline"],
                        micro_batch_size=settings["micro_batch"], grad_accum=settings["grad_accum"],
                        seq_length=settings["seq_length"],
                        activation_checkpointing=settings["activation_checkpointing"],
                        precision=settings["precision"], attention=args.attention)
        plan = plan_memory(model, layout)
    except UserError:
        raise  # a config file's error, named by its field
    except ValueError as error:  # the flags' values, checked by the planner
        raise UserError(str(error)) from error
    if args.json:
        summary = plan.summary()
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))
    else:
        print(format_report(plan, settings, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
