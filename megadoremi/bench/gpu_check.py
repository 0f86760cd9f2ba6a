"""``make gpu-check``: the GPU questions answered in one prepared run, one JSON file per part as it finishes.

On one CUDA device (or on CPU with ``--device cpu --preset tiny --quick``, which the test suite runs so this
cannot rot), in this order, into ``--out DIR``:

1. ``environment.json``: device, memory, torch / CUDA / cuDNN / NCCL / DeepSpeed versions, and which SDPA kernel
   our attention call (causal, the preset's heads and head size, the training dtype) runs: the ATen ops a
   profiled call records (flash, memory-efficient, cuDNN or math), and which backends accept it alone.
2. ``correctness_bf16.json``: ``steps`` steps of the correctness preset (``70m``) in bf16 and in fp32 on the same
   batches (one data stream, seed and initialisation), per-step losses within ``BF16_LOSS_RTOL``; and what the
   bf16 path holds: DeepSpeed's bf16 mode, bf16 parameters, fp32 master weights and optimiser states, fp32
   token losses, float64 per-domain statistics.
3. ``correctness_doremi.json``: the DoReMi proxy objective's alpha trajectory in bf16 and fp32 (the reference
   is the fp32 model of part 2), within ``ALPHA_ATOL``; the DRO state in float64.
4. ``correctness_zero3.json``: ZeRO-3 against ZeRO-0 on one rank, in fp32 (``ZERO3_FP32_RTOL``) and bf16
   (``BF16_LOSS_RTOL``).
5. ``perf_*.json``: ``megadoremi.bench.train_bench`` at the performance preset (``280m``, the paper's 256k
   vocabulary, sequence 1024): tokens/s, MFU against the device's dense peak (``GPU_PEAK_TFLOPS``, or
   ``--peak-tflops``) and the framework / bare-loop ratio, without (``perf_overhead``) and with
   (``perf_checkpointing``) activation checkpointing, at the largest micro-batch the memory planner says fits,
   verified by running it (``perf_largest_micro_batch``); the DoReMi proxy step over a plain step with the live
   and the cached reference (``perf_proxy``); ADO and ODM steps over a static-mixture step (``perf_mixing``).
6. ``summary.json`` and a table on stdout.

A part that fails is recorded (``"status": "error"`` with the traceback's end) and the next one runs; parts not
started before ``--time-limit-s`` are recorded as skipped. Exit status 0 when every part passed, 1 otherwise,
2 for bad options. Nothing is installed or downloaded: the data is the built-in demo corpus and random tokens.
See docs/gpu.md.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

BF16_LOSS_RTOL = 0.02  # |loss_bf16 - loss_fp32| / loss_fp32 at every step (bf16 rounds to ~3 significant digits)
ALPHA_ATOL = 0.02  # |alpha_bf16 - alpha_fp32| for every domain and step
ZERO3_FP32_RTOL = 1e-4  # ZeRO-3 vs ZeRO-0 in fp32: only the order of fp32 reductions differs
PERF_VOCAB_SIZE = 256_000  # the paper's vocabulary
CORRECTNESS_VOCAB_SIZE = 8000  # a SentencePiece model trained on the demo corpus (the demo's size)


def _settings(args) -> dict:
    """Sizes for the full (GPU) and the quick (CPU test) form; --preset sets both presets."""
    if args.quick:
        settings = {"correctness_preset": "tiny", "correctness_vocab": 512, "correctness_seq": 32,
                    "correctness_micro_batch": 4, "steps": 4, "perf_preset": "tiny", "perf_vocab": 512,
                    "perf_seq": 64, "perf_micro_batch": 2, "perf_steps": 2, "perf_warmup": 3,
                    "max_micro_batch": 8, "gemm_size": 256}
    else:
        settings = {"correctness_preset": "70m", "correctness_vocab": CORRECTNESS_VOCAB_SIZE, "correctness_seq": 256,
                    "correctness_micro_batch": 8, "steps": 20, "perf_preset": "280m", "perf_vocab": PERF_VOCAB_SIZE,
                    "perf_seq": 1024, "perf_micro_batch": 8, "perf_steps": 10, "perf_warmup": 3,
                    "max_micro_batch": 256, "gemm_size": None}
    if args.preset:
        settings["correctness_preset"] = settings["perf_preset"] = args.preset.lower()
    if args.steps:
        settings["steps"] = args.steps
    return settings


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- 1. environment -----------------------------------------------------------------------------------------


def sdpa_kernels(device, dtype, batch: int, heads: int, seq: int, head_dim: int) -> dict:
    """Which kernel ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` runs for these shapes: the SDPA
    ATen ops a profiled call records, and each backend tried alone (accepted or the reason it refused)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    ops = sorted({event.name for event in prof.events()
                  if "scaled_dot_product" in event.name or "attention" in event.name.lower()})
    kinds = {"flash": "flash", "efficient": "memory-efficient", "cudnn": "cudnn", "math": "math"}
    chosen = [label + (" (CPU)" if any("for_cpu" in op for op in ops) else "") for key, label in kinds.items()
              if any(key in op and not op.endswith("scaled_dot_product_attention") for op in ops)]
    backends = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            backends[name.lower()] = "accepted"
        except RuntimeError as error:
            backends[name.lower()] = "refused: " + " ".join(str(error).split())[:160]
    return {"shape": [batch, heads, seq, head_dim], "dtype": str(dtype).replace("torch.", ""),
            "aten_ops": ops, "kernel": chosen[0] if chosen else "unknown", "backends_alone": backends}


def environment(device, settings: dict) -> dict:
    import deepspeed
    import torch

    from megadoremi.bench.train_bench import lookup_peak_tflops
    from megadoremi.model.presets import gpt_config_from_preset

    cuda = device.type == "cuda"
    info = {"device_type": device.type, "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "hostname": platform.node()}
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    nccl=".".join(map(str, torch.cuda.nccl.version())),
                    peak_bf16_tflops_spec=lookup_peak_tflops(props.name, True))
    else:
        info.update(device=platform.processor() or platform.machine(), memory_gib=None, nccl=None)
    model = gpt_config_from_preset(settings["perf_preset"], settings["perf_vocab"], settings["perf_seq"])
    info["sdpa"] = sdpa_kernels(device, torch.bfloat16 if cuda else torch.float32, settings["perf_micro_batch"],
                                model.num_heads, settings["perf_seq"], model.head_dim)
    return {"status": "ok", **info}


# --- 2-4. correctness -----------------------------------------------------------------------------------------


def _correctness_config(workdir: str, data: dict, settings: dict, name: str, precision: str, zero_stage: int = 0,
                        doremi: dict | None = None) -> dict:
    config = {
        "run_dir": os.path.join(workdir, "runs", name),
        "model": {"preset": settings["correctness_preset"]},
        "data": {"domains": data["domains"], "tokenizer_model": data["tokenizer_model"], "split": "90,10,0",
                 "cache_dir": os.path.join(workdir, "index-cache")},
        "train": {"steps": settings["steps"], "micro_batch_size": settings["correctness_micro_batch"],
                  "grad_accum": 1, "seq_length": settings["correctness_seq"], "lr": 1e-3, "min_lr": 1e-4,
                  "precision": precision, "seed": 1234, "log_interval": 1},
        "parallel": {"zero_stage": zero_stage},
        "eval": {"interval": 0, "max_samples_per_domain": 1},
        "checkpoint": {"interval": 0, "resume": "none"},
    }
    if doremi:
        config["doremi"] = {"enabled": True, **doremi}
    return config


def _bf16_path_facts(trainer) -> dict:
    """What the bf16 (or fp32) code path holds after training: precisions of parameters, master weights,
    optimiser states, logits, token losses and statistics."""
    import torch

    from megadoremi.model.gpt import token_losses

    engine = trainer.engine
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimiser DeepSpeed wraps
    held = [p for group in inner.param_groups for p in group["params"] if p.numel()]
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        # ZeRO-3 hands its fp32 partitions to the torch optimiser only during the step
        held = held or [p for p in getattr(engine.optimizer, name, None) or [] if p.numel()]
    master = held[0]  # a master weight (a flat fp32 partition under bf16 / ZeRO)
    exp_avg = next((inner.state[p]["exp_avg"] for p in held if "exp_avg" in inner.state.get(p, {})), None)
    tokens = trainer.batches.micro_batches(0)[0]["tokens"].to(trainer.device)
    with torch.no_grad():
        logits = engine(tokens[:, :-1])
        losses = token_losses(logits, tokens[:, 1:])
    facts = {"deepspeed_bf16": bool(engine.bfloat16_enabled()),
             "parameter_dtype": str(next(engine.module.parameters()).dtype),
             "master_weight_dtype": str(master.dtype),
             "optimizer_state_dtype": None if exp_avg is None else str(exp_avg.dtype),
             "logits_dtype": str(logits.dtype), "token_loss_dtype": str(losses.dtype),
             "domain_stats_dtype": str(trainer.stats.sums.dtype)}
    state = getattr(trainer.objective, "state", None)
    if state is not None:
        facts["dro_weights_dtype"] = f"numpy.{state.weights.dtype}"
    return facts


def train_steps(config_dict: dict, env, steps: int, export: bool = False) -> dict:
    """Train a fresh Trainer for ``steps`` steps in this process; losses, alphas, the path's facts."""
    import torch

    from megadoremi.config import config_from_dict
    from megadoremi.distributed.plan import resolve_batch_plan
    from megadoremi.train.export import export_model
    from megadoremi.train.trainer import Trainer

    config = config_from_dict(config_dict)
    trainer = Trainer(config, env, resolve_batch_plan(config.train, config.parallel, env.world_size))
    try:
        trainer.setup()
        losses, alphas = [], []
        for _ in range(steps):
            record = trainer.step()
            losses.append(record["loss"])
            if "doremi_alpha" in record:
                alphas.append([record["doremi_alpha"][name] for name in trainer.domain_names])
        result = {"losses": losses, "alphas": alphas, "facts": _bf16_path_facts(trainer),
                  "domains": trainer.domain_names}
        if export:
            result["model"] = export_model(trainer.trained, trainer.run_dir, env.rank)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return result
    finally:
        if getattr(trainer, "metrics", None) is not None:  # absent when setup() failed early
            trainer.metrics.close()
        if trainer.run_lock is not None:
            trainer.run_lock.release()
        del trainer
        _free_memory()


def _max_rel(a: list, b: list) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def correctness(env, workdir: str, data: dict, settings: dict, write) -> None:
    """Parts 2-4; ``write(name, result)`` writes each part's JSON as soon as it is known."""
    steps = settings["steps"]
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = train_steps(_correctness_config(workdir, data, settings, f"lm-{precision}", precision),
                                      env, steps, export=precision == "fp32")
    facts = runs["bf16"]["facts"]
    expected = {"deepspeed_bf16": True, "parameter_dtype": "torch.bfloat16", "master_weight_dtype": "torch.float32",
                "optimizer_state_dtype": "torch.float32", "logits_dtype": "torch.bfloat16",
                "token_loss_dtype": "torch.float32", "domain_stats_dtype": "torch.float64"}
    wrong = {key: facts.get(key) for key, value in expected.items() if facts.get(key) != value}
    worst = _max_rel(runs["bf16"]["losses"], runs["fp32"]["losses"])
    write("correctness_bf16", {
        "status": "ok" if worst <= BF16_LOSS_RTOL and not wrong else "fail", "preset": settings["correctness_preset"],
        "steps": steps, "losses_fp32": runs["fp32"]["losses"], "losses_bf16": runs["bf16"]["losses"],
        "max_rel_diff": worst, "tolerance_rel": BF16_LOSS_RTOL, "bf16_path": facts, "fp32_path": runs["fp32"]["facts"],
        "bf16_path_expected": expected, "bf16_path_wrong": wrong})

    doremi = {"reference_model": runs["fp32"]["model"], "order": "auto"}
    proxies = {precision: train_steps(_correctness_config(workdir, data, settings, f"proxy-{precision}", precision,
                                                          doremi=doremi), env, steps)
               for precision in ("fp32", "bf16")}
    alpha_diff = max(abs(x - y) for a, b in zip(proxies["bf16"]["alphas"], proxies["fp32"]["alphas"])
                     for x, y in zip(a, b))
    dro_dtype = proxies["bf16"]["facts"].get("dro_weights_dtype")
    write("correctness_doremi", {
        "status": "ok" if alpha_diff <= ALPHA_ATOL and dro_dtype == "numpy.float64" else "fail",
        "steps": steps, "domains": proxies["fp32"]["domains"], "alpha_fp32": proxies["fp32"]["alphas"],
        "alpha_bf16": proxies["bf16"]["alphas"], "max_abs_diff": alpha_diff, "tolerance_abs": ALPHA_ATOL,
        "dro_weights_dtype": dro_dtype, "losses_fp32": proxies["fp32"]["losses"],
        "losses_bf16": proxies["bf16"]["losses"], "reference": "the fp32 model of correctness_bf16"})

    zero = {}
    for precision, tolerance in (("fp32", ZERO3_FP32_RTOL), ("bf16", BF16_LOSS_RTOL)):
        zero3 = train_steps(_correctness_config(workdir, data, settings, f"zero3-{precision}", precision,
                                                zero_stage=3), env, steps)
        difference = _max_rel(zero3["losses"], runs[precision]["losses"])
        zero[precision] = {"losses_zero0": runs[precision]["losses"], "losses_zero3": zero3["losses"],
                           "max_rel_diff": difference, "tolerance_rel": tolerance, "ok": difference <= tolerance,
                           "zero3_path": zero3["facts"]}
    write("correctness_zero3", {"status": "ok" if all(z["ok"] for z in zero.values()) else "fail", "steps": steps,
                                **zero})


# --- 5. performance ---------------------------------------------------------------------------------------


def _bench(settings: dict, args, **overrides) -> dict:
    import torch

    from megadoremi.bench.train_bench import TrainBenchConfig, run_benchmark
    from megadoremi.distributed.env import discover_environment

    fields = {"preset": settings["perf_preset"], "vocab_size": settings["perf_vocab"],
              "seq_length": settings["perf_seq"], "micro_batch_size": settings["perf_micro_batch"],
              "steps": settings["perf_steps"], "warmup_steps": settings["perf_warmup"], "block_steps": 2,
              "peak_tflops": args.peak_tflops, "gemm_size": settings["gemm_size"], "log_interval": 10}
    fields.update(overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run_benchmark(TrainBenchConfig(**fields), discover_environment())
    if torch.cuda.is_available():
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    _free_memory()
    return {"status": "ok", **result}


def _is_out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower()


def largest_micro_batch(settings: dict, args, device) -> dict:
    """The largest power-of-two micro-batch (up to ``max_micro_batch``) the memory planner fits on the device,
    run for real; halved (up to twice) if the device says otherwise."""
    import torch

    from megadoremi.memory_plan import Layout, plan_memory
    from megadoremi.model.presets import gpt_config_from_preset

    cuda = device.type == "cuda"
    memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else args.cpu_memory_gib
    model = gpt_config_from_preset(settings["perf_preset"], settings["perf_vocab"], settings["perf_seq"])
    planned = {}
    micro_batch = 1
    while micro_batch <= settings["max_micro_batch"]:
        plan = plan_memory(model, Layout(num_gpus=1, micro_batch_size=micro_batch, seq_length=settings["perf_seq"],
                                         precision="bf16" if cuda else "fp32"))
        planned[micro_batch] = plan.worst.total_bytes / 2**30
        if not plan.fits(memory_gib):
            break
        micro_batch *= 2
    fitting = [mb for mb in planned if planned[mb] <= memory_gib * 0.9] or [1]
    chosen = max(fitting)
    attempts = []
    for _ in range(3):
        try:
            result = _bench(settings, args, micro_batch_size=chosen)
            return {**result, "planned_gib": planned, "device_memory_gib": memory_gib, "chosen_micro_batch": chosen,
                    "planned_gib_chosen": planned.get(chosen), "attempts": attempts + [chosen]}
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not _is_out_of_memory(error) or chosen == 1:
                raise
            attempts.append(chosen)
            _free_memory()
            chosen //= 2
    raise RuntimeError(f"out of memory at micro-batches {attempts}")


# --- driver ----------------------------------------------------------------------------------------------


def _summary_line(name: str, part: dict) -> str:
    status = part.get("status", "?")
    if status != "ok":
        detail = part.get("error", "").strip().splitlines()[-1:] or [part.get("reason", "")]
        return f"{name:28s} {status:8s} {detail[0][:90]}"
    figures = {
        "environment": lambda p: f"{p.get('device')} | torch {p['torch']} CUDA {p['cuda_runtime']} NCCL {p['nccl']} "
                                 f"DeepSpeed {p['deepspeed']} | SDPA {p['sdpa']['kernel']}",
        "correctness_bf16": lambda p: f"max rel loss diff {p['max_rel_diff']:.2e} (<= {p['tolerance_rel']})",
        "correctness_doremi": lambda p: f"max alpha diff {p['max_abs_diff']:.2e} (<= {p['tolerance_abs']})",
        "correctness_zero3": lambda p: f"fp32 {p['fp32']['max_rel_diff']:.1e}, bf16 {p['bf16']['max_rel_diff']:.1e}",
        "perf_proxy": lambda p: f"live {p['ratio_proxy_live_over_plain']:.3f}x, cached "
                                f"{p['ratio_proxy_cached_over_plain']:.3f}x a plain step",
        "perf_mixing": lambda p: f"ADO {p['ratio_ado_over_static']:.3f}x, ODM {p['ratio_odm_over_static']:.3f}x "
                                 "a static step",
    }
    if name in figures:
        return f"{name:28s} {status:8s} {figures[name](part)}"
    return (f"{name:28s} {status:8s} micro-batch {part['micro_batch_size']}: {part['tokens_per_second']:,.0f} "
            f"tokens/s, MFU {100 * part['mfu']:.1f}%, framework/bare {part['ratio_framework_over_bare']:.3f}")


def run_check(args) -> int:
    import torch

    from megadoremi.bench.train_bench import write_corpus_data
    from megadoremi.distributed.env import discover_environment, init_distributed

    settings = _settings(args)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    parts = {}

    def write(name: str, result: dict) -> None:
        result = {"part": name, "elapsed_s": time.monotonic() - started, **result}
        parts[name] = result
        path = os.path.join(args.out, name + ".json")
        with open(path + ".tmp", "w") as handle:
            json.dump(result, handle, indent=1, default=str)
        os.replace(path + ".tmp", path)
        print(_summary_line(name, result), flush=True)

    def attempt(name: str, function, *names) -> None:
        """Run one part (or several that ``function`` writes itself); record an error or a skip."""
        pending = names or (name,)
        if time.monotonic() - started > args.time_limit_s:
            for part in pending:
                write(part, {"status": "skipped", "reason": f"--time-limit-s {args.time_limit_s} reached"})
            return
        try:
            result = function()
            if result is not None:
                write(name, result)
        except Exception:  # noqa: BLE001 -- record it and go on to the next part
            error = traceback.format_exc(limit=8)
            for part in pending:
                if part not in parts:
                    write(part, {"status": "error", "error": error})
            _free_memory()

    env = discover_environment()
    init_distributed(env)
    if env.world_size != 1:
        raise SystemExit("gpu_check: runs as one process on one device (python tools/gpu_check.py)")
    workdir = tempfile.mkdtemp(prefix="megadoremi-gpu-check-", dir=args.workdir)
    try:
        attempt("environment", lambda: environment(device, settings))
        data = {}

        def correctness_parts():
            data.update(write_corpus_data(workdir, settings["correctness_vocab"], 400_000, seed=0))
            correctness(env, workdir, data, settings, write)

        attempt("correctness", correctness_parts, "correctness_bf16", "correctness_doremi", "correctness_zero3")
        attempt("perf_overhead", lambda: _bench(settings, args))
        attempt("perf_checkpointing", lambda: _bench(settings, args, activation_checkpointing=True))
        attempt("perf_largest_micro_batch", lambda: largest_micro_batch(settings, args, device))
        attempt("perf_proxy", lambda: _bench(settings, args, mode="proxy"))
        attempt("perf_mixing", lambda: _bench(settings, args, mode="mixing"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = all(part.get("status") == "ok" for part in parts.values())
    summary = {"status": "ok" if ok else "fail", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "elapsed_s": time.monotonic() - started, "settings": settings, "device": args.device,
               "parts": {name: {"status": part.get("status"), "line": _summary_line(name, part)}
                         for name, part in parts.items()}}
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    print(f"\ngpu-check summary ({args.device}, {summary['elapsed_s']:.0f} s, {args.out}):")
    for name, part in parts.items():
        print("  " + _summary_line(name, part))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="directory for the JSON files (created)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--preset", default=None, help="model preset of every part (default: 70m for correctness, "
                                                       "280m for performance)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (the CPU test's form)")
    parser.add_argument("--steps", type=int, default=None, help="correctness steps (default 20; 4 with --quick)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak per device for MFU (default: the spec-sheet table, else a measured GEMM)")
    parser.add_argument("--time-limit-s", type=float, default=480.0,
                        help="start no part after this many seconds (default %(default)s: 8 minutes)")
    parser.add_argument("--cpu-memory-gib", type=float, default=2.0,
                        help="memory the largest-micro-batch search may plan for on CPU (default %(default)s)")
    parser.add_argument("--workdir", default=None, help="where temporary data goes (default: the temp dir)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks CUDA for its devices
    import torch

    from megadoremi.distributed.env import prepare_process_environment
    from megadoremi.utils.logging import configure_logging

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (torch " + torch.__version__ + "); use --device cpu, or "
              "prepare a CUDA environment (docs/gpu.md)", file=sys.stderr)
        return 2
    from megadoremi.model.presets import PRESETS

    if args.preset is not None and args.preset.lower() not in PRESETS:
        print(f"gpu_check: --preset: unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}", file=sys.stderr)
        return 2
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        print(f"gpu_check: --peak-tflops must be positive, got {args.peak_tflops}", file=sys.stderr)
        return 2
    prepare_process_environment()
    configure_logging(rank=0)
    return run_check(args)
