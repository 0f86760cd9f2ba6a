"""Training throughput and MFU of a preset and parallel layout, and the framework's overhead over a bare loop.

In one run, on every rank, two loops train the same GPT (same preset, shape, seed, so the same initial weights)
on the same batches with the same optimiser settings and LR schedule:

- **framework**: the real ``Trainer`` (DeepSpeed engine, training stream, per-domain loss statistics). One
  timed step is the body of ``Trainer.run``'s loop without evaluation and checkpoints: ``Trainer.step()``
  (reading and collating the micro-batches from the memory-mapped datasets, moving them to the device, forward,
  backward, ``engine.step``, the statistics all-reduce, the objective's and the mixture's end of step, the
  metrics every ``log_interval`` steps: metrics.jsonl, TensorBoard, the log line, the grad-norm query) and
  ``Trainer.stop_requested()`` (the stop-signal all-reduce).
- **bare**: ``GPT`` + ``torch.optim.AdamW`` (same decay / no-decay groups) + ``clip_grad_norm_`` + the same
  ``LambdaLR`` schedule, gradient accumulation by dividing the loss. Its batches are the framework's, read
  before timing and already on the device, so its data fetch is a list lookup; one ``float(loss)`` per step
  (a host sync, as any loop that logs its loss has). No communication: under several ranks each rank trains
  its own copy on its data-parallel rank's batch (the bare loop is DDP-free per-rank compute). With pipeline
  stages every stage rank runs the whole model on that batch, so there the ideal ratio is 1 / stages, not 1.

The two alternate in ABBA blocks of ``block_steps`` steps (framework-bare, bare-framework, ...) after untimed
warmup steps, with a barrier before every block; a step's time is the slowest rank's, and the report gives
medians. Precision: fp32 on both sides, or bf16 where the framework uses DeepSpeed's bf16 mode (bf16 weights
and activations, fp32 master weights and optimiser states) and the bare loop keeps fp32 weights under
``torch.autocast(bfloat16)`` (bf16 matmuls, fp32 optimiser): the matmuls, hence the counted FLOPs, are bf16 on
both sides.

``--mode proxy`` times a plain Trainer step against DoReMi proxy steps (live reference model, and cached reference
losses); ``--mode mixing`` times a static-mixture step against ADO and ODM steps (both moving from the first step;
ADO with a fit in place) and one ADO refit at the reference's size (22 domains, a 60k-step history), amortised
over its 1000-step refit interval.

FLOPs per token: ``megadoremi.model.flops.flops_per_token`` (6 x matmul parameters, logits included, plus the
attention scores over the full seq x seq square; ``mfu_causal_attention`` counts half of that square).
MFU = tokens/s x flops_per_token / (peak per device x world size). The peak is the vendor's dense figure for
known GPUs (bf16 tensor core, or fp32 without TF32), ``--peak-tflops`` when given, and otherwise (CPU, unknown
GPU) a GEMM measured in this run on every rank at once: the best of several large square matmuls in the
training precision, summed over ranks. It is the achievable matmul rate, not a spec-sheet peak, and the report
says so. On a shared CPU host other processes stretch wall time, so the report also gives each step's process
CPU time and, on CPU, ``mfu_cpu_time``: FLOPs per second of the rank's own CPU time over the GEMM's FLOPs per
CPU-second (the same ratio, with the waits for other processes taken out of both).
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megadoremi.config import ConfigError, config_from_dict
from megadoremi.distributed.engine import lr_at, use_bf16
from megadoremi.distributed.plan import resolve_batch_plan
from megadoremi.doremi.reference import write_reference_losses
from megadoremi.model.flops import FLOPS_FORMULA, flops_per_token
from megadoremi.model.gpt import GPT, GPTConfig, token_losses
from megadoremi.model.io import write_model_file
from megadoremi.model.presets import PRESETS
from megadoremi.train.build import build_model_config, build_stream_spec
from megadoremi.train.trainer import Trainer
from megadoremi.utils.logging import configure_logging, get_logger

logger = get_logger(__name__)

MODES = ("overhead", "proxy", "mixing")
DEFAULT_VOCAB_SIZE = 512
SYNTHETIC_DOMAINS = ("synthetic_a", "synthetic_b", "synthetic_c")
CORPUS_DOMAINS = ("stdlib_code", "licenses", "arithmetic", "boilerplate", "random_chars")
# Dense peak TFLOP/s per device from the vendors' spec sheets: (name substring, bf16 tensor core, fp32 no TF32).
# The first match wins, so the PCIe / NVL variants come before the SXM default.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
)
# --- FLOPs and peak -------------------------------------------------------------------------------------


def lookup_peak_tflops(device_name: str, bf16: bool) -> float | None:
    """Spec-sheet dense peak of a known GPU in the training precision, or None."""
    for key, bf16_peak, fp32_peak in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return bf16_peak if bf16 else fp32_peak
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> tuple[float, float]:
    """Best FLOP/s of a (size x size) @ (size x size) matmul over ``repeats`` runs: per wall second, and per
    second of this process's CPU time (all its threads; the rate the matmul gets from the CPU time it is given)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    torch.mm(a, b)
    best_s, best_cpu_s = math.inf, math.inf
    for _ in range(repeats):
        _synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        _synchronize(device)
        best_s = min(best_s, time.perf_counter() - started)
        best_cpu_s = min(best_cpu_s, time.process_time() - cpu_started)
    return 2.0 * size**3 / best_s, 2.0 * size**3 / max(best_cpu_s, 1e-9)


# --- data -----------------------------------------------------------------------------------------------


def write_synthetic_data(root: str, vocab_size: int, num_tokens_per_domain: int, doc_length: int, seed: int):
    """Uniformly random documents of ``doc_length`` tokens, one indexed dataset per synthetic domain."""
    from megadoremi.data.indexed_dataset import IndexedDatasetWriter, best_dtype

    rng = np.random.default_rng(seed)
    num_docs = max(20, math.ceil(num_tokens_per_domain / doc_length))  # >= 2 documents in the 10% eval split
    prefixes = {}
    for name in SYNTHETIC_DOMAINS:
        prefix = os.path.join(root, "data", name)
        with IndexedDatasetWriter(prefix, best_dtype(vocab_size)) as writer:
            tokens = rng.integers(0, vocab_size, size=num_docs * doc_length, dtype=np.int64)
            writer.add_documents(tokens, np.full(num_docs, doc_length, dtype=np.int64))
        prefixes[name] = prefix
    return {"domains": prefixes, "tokenizer_model": None}


def write_corpus_data(root: str, vocab_size: int, num_tokens_per_domain: int, seed: int) -> dict:
    """The demo corpus, a SentencePiece tokenizer of ``vocab_size`` pieces, one indexed dataset per domain."""
    from megadoremi.data.demo_corpus import make_demo_corpus, tokenize_demo_files
    from megadoremi.data.tokenizer import train_tokenizer

    corpus_dir = os.path.join(root, "corpus")
    # ~3 bytes per token with a small BPE vocabulary; short domains are oversampled (a warning), which is fine.
    files = make_demo_corpus(corpus_dir, seed=seed, target_bytes_per_domain=max(120_000, 4 * num_tokens_per_domain),
                             domains=list(CORPUS_DOMAINS))
    model_prefix = os.path.join(root, "tokenizer")
    try:
        train_tokenizer(corpus_dir, model_prefix, vocab_size, max_chars=300_000, seed=seed)
    except RuntimeError as error:
        raise ConfigError(f"--vocab-size {vocab_size}: cannot train a tokenizer of that size on the demo corpus "
                          f"({error}); use --data synthetic") from None
    prefixes = tokenize_demo_files(files, model_prefix + ".model", os.path.join(root, "data"))
    return {"domains": prefixes, "tokenizer_model": model_prefix + ".model"}


# --- the two loops --------------------------------------------------------------------------------------


class _TimedBatches:
    """Wraps the trainer's TrainBatches to time its data path (read + collate) without changing it."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0

    def micro_batches(self, step: int) -> list[dict]:
        started = time.perf_counter()
        batches = self.inner.micro_batches(step)
        self.seconds = time.perf_counter() - started
        return batches

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _TimedReference:
    """Wraps a DoReMi proxy's reference (live model or cache) to time its ``losses`` calls within a step."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0

    def losses(self, batch: dict) -> torch.Tensor:
        started = time.perf_counter()
        losses = self.inner.losses(batch)
        _synchronize(losses.device)  # on a GPU, the forward's time, not its launch
        self.seconds += time.perf_counter() - started
        return losses

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FrameworkLoop:
    """One step = the body of ``Trainer.run``'s loop minus evaluation and checkpoints, timed in parts."""

    def __init__(self, trainer, num_steps: int):
        self.trainer, self.num_steps = trainer, num_steps
        self.data = _TimedBatches(trainer.batches)
        trainer.batches = self.data
        self.reference = None
        if getattr(trainer.objective, "reference", None) is not None:
            self.reference = _TimedReference(trainer.objective.reference)
            trainer.objective.reference = self.reference

    def step(self, step: int) -> tuple[float, float, dict]:
        """Train step ``step`` (0-based, the trainer's next step); returns (loss, seconds, seconds per part)."""
        trainer = self.trainer
        if trainer.next_step != step:
            raise RuntimeError(f"framework loop: asked for step {step}, the trainer is at step {trainer.next_step}")
        if self.reference is not None:
            self.reference.seconds = 0.0
        started = time.perf_counter()
        record = trainer.step()
        stepped = time.perf_counter()
        trainer.stop_requested()
        ended = time.perf_counter()
        seconds = trainer.last_step_seconds
        parts = {"data": self.data.seconds}
        if self.trainer.objective.name == "doremi":
            # Reference losses (the live model's forward, or the cache read); 0 on pipeline stages without the loss.
            parts["reference"] = self.reference.seconds if self.reference is not None else 0.0
        parts["forward_backward_step"] = seconds["train"] - sum(parts.values())
        parts.update({"loss_reduce": seconds["reduce_update"], "log": seconds["log"] + (stepped - started
                      - sum(seconds.values())), "stop_check": ended - stepped})
        return record["loss"], ended - started, parts


class BareLoop:
    """The same GPT, batches and optimisation in plain PyTorch: AdamW, clip_grad_norm_, LambdaLR."""

    def __init__(self, model_config: GPTConfig, experiment, device: torch.device, bf16: bool, batches: list):
        train = experiment.train
        self.device, self.bf16, self.grad_clip = device, bf16, train.grad_clip
        self.model = GPT(model_config, seed=train.seed,
                         activation_checkpointing=experiment.model.activation_checkpointing).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                                           weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_at(step, train) / train.lr)
        self.batches = batches  # [step][micro] -> tokens (micro_batch, seq + 1) on the device

    def step(self, step: int) -> tuple[float, float, dict]:
        """Train step ``step`` (0-based); returns (loss, seconds, {})."""
        started = time.perf_counter()
        micro_batches = self.batches[step]
        loss_sum, num_tokens = 0.0, 0
        for tokens in micro_batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(tokens[:, :-1])  # (batch, seq, vocab)
            losses = token_losses(logits, tokens[:, 1:])  # (batch, seq) fp32
            (losses.mean() / len(micro_batches)).backward()
            loss_sum = loss_sum + losses.detach().sum()
            num_tokens += losses.numel()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        loss = float(loss_sum) / num_tokens
        _synchronize(self.device)
        return loss, time.perf_counter() - started, {}


def run_blocks(loops: dict, steps: range, block_steps: int, barrier) -> dict:
    """Alternate the loops in ABBA blocks of ``block_steps`` steps; returns per-loop step records."""
    records = {name: [] for name in loops}
    names = list(loops)
    for block, first in enumerate(range(steps.start, steps.stop, block_steps)):
        for name in names if block % 2 == 0 else names[::-1]:
            barrier()
            for step in range(first, min(first + block_steps, steps.stop)):
                cpu_started = time.process_time()
                loss, seconds, parts = loops[name].step(step)
                records[name].append({"step": step, "loss": loss, "seconds": seconds, "parts": parts,
                                      "cpu_seconds": time.process_time() - cpu_started})
    return records


# --- the run --------------------------------------------------------------------------------------------


@dataclass
class TrainBenchConfig:
    """What to benchmark; ``validate()`` names the offending option."""

    mode: str = "overhead"  # overhead: Trainer vs a bare loop | proxy: DoReMi proxy steps vs plain steps |
    # mixing: ADO and ODM steps vs static-mixture steps
    preset: str = "tiny"
    seq_length: int = 256
    micro_batch_size: int = 4
    grad_accum: int = 1
    steps: int = 20
    warmup_steps: int = 3
    block_steps: int = 2
    zero_stage: int = 0
    pipeline_stages: int = 1
    vocab_size: int | None = None
    precision: str = "auto"
    peak_tflops: float | None = None
    data: str = "synthetic"
    log_interval: int = 1
    seed: int = 1234
    workdir: str | None = None
    activation_checkpointing: bool = False
    gemm_size: int | None = None  # the square GEMM measured for the peak (None: 8192 on a GPU, 1536 on CPU)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "mixing" and self.warmup_steps < 3:
            raise ConfigError(f"--warmup-steps: --mode mixing needs at least 3 (ADO fits to them), got "
                              f"{self.warmup_steps}")
        if self.preset.lower() not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in ("seq_length", "micro_batch_size", "grad_accum", "steps", "block_steps", "log_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps: must be >= 0, got {self.warmup_steps}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(f"--vocab-size: must be positive, got {self.vocab_size}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"--peak-tflops: must be positive, got {self.peak_tflops}")


def _broadcast(value):
    if dist.is_initialized() and dist.get_world_size() > 1:
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def _all_gather(value) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered
    return [value]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _load_average() -> float | None:
    """The host's 1-minute load average: above the core count, other work competed with this run."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores)"


def _experiment_dict(bench: TrainBenchConfig, data: dict, workdir: str, total_steps: int) -> dict:
    data_section = {"domains": data["domains"], "split": "90,10,0", "cache_dir": os.path.join(workdir, "index-cache")}
    model = {"preset": bench.preset, "activation_checkpointing": bench.activation_checkpointing}
    if data["tokenizer_model"]:
        data_section["tokenizer_model"] = data["tokenizer_model"]
    else:
        model["vocab_size"] = bench.vocab_size or DEFAULT_VOCAB_SIZE
    return {
        "run_dir": os.path.join(workdir, "run"), "model": model, "data": data_section,
        "train": {"steps": total_steps, "micro_batch_size": bench.micro_batch_size, "grad_accum": bench.grad_accum,
                  "seq_length": bench.seq_length, "precision": bench.precision, "seed": bench.seed,
                  "log_interval": bench.log_interval},
        "parallel": {"zero_stage": bench.zero_stage, "pipeline_stages": bench.pipeline_stages},
        "eval": {"interval": 0, "max_samples_per_domain": 1},
        "checkpoint": {"interval": 0, "resume": "none"},
    }


def _per_step_max(gathered: list[list[dict]], key) -> list[float]:
    """For each timed step, the slowest rank's value of ``key(record)``."""
    return [max(key(ranks[i]) for ranks in gathered) for i in range(len(gathered[0]))]


def _overhead_loops(experiment, env, plan, device, bf16, total_steps):
    """The framework (Trainer) and bare loops of ``--mode overhead``; returns (loops, trainers)."""
    trainer = Trainer(experiment, env, plan)
    trainer.setup()
    batches = [[b["tokens"].to(device) for b in trainer.batches.micro_batches(step)] for step in range(total_steps)]
    loops = {"framework": FrameworkLoop(trainer, total_steps),
             "bare": BareLoop(trainer.model_config, experiment, device, bf16, batches)}
    return loops, [trainer]


def _framework_loops(configs: dict, env, plan, total_steps: int):
    """A set-up Trainer and its timed FrameworkLoop per named config; returns (loops, trainers)."""
    trainers = {}
    for name, config in configs.items():
        trainers[name] = Trainer(config, env, plan)
        trainers[name].setup()
    loops = {name: FrameworkLoop(trainer, total_steps) for name, trainer in trainers.items()}
    return loops, list(trainers.values())


def _proxy_loops(bench, experiment_dict: dict, env, plan, workdir: str, total_steps: int):
    """The three Trainers of ``--mode proxy``; returns (loops, trainers).

    plain: a normal run. proxy_live: DoReMi proxy with the reference model run forward on every micro-batch.
    proxy_cached: the same proxy reading the reference losses from a cache computed beforehand (not timed).
    Same preset, seed, data stream and layout. The reference is a GPT of the proxy's shape with other random
    weights (what it computes does not change its cost), written as a ``model.pt`` like a finished reference run.
    """
    reference_path = os.path.join(workdir, "reference", "model.pt")
    cache_prefix = os.path.join(workdir, "reference", "losses")
    live = {"enabled": True, "reference_model": reference_path}
    configs = {
        "plain": config_from_dict({**experiment_dict, "run_dir": os.path.join(workdir, "run-plain")}),
        "proxy_live": config_from_dict({**experiment_dict, "run_dir": os.path.join(workdir, "run-proxy-live"),
                                        "doremi": live}),
        "proxy_cached": config_from_dict({**experiment_dict, "run_dir": os.path.join(workdir, "run-proxy-cached"),
                                          "doremi": {**live, "reference_losses": cache_prefix}}),
    }
    model_config = build_model_config(configs["plain"])
    if env.rank == 0:
        os.makedirs(os.path.dirname(reference_path), exist_ok=True)
        reference = GPT(model_config, seed=bench.seed + 1)
        write_model_file({k: v.detach().float() for k, v in reference.state_dict().items()}, model_config,
                         reference_path)
    _barrier()
    logger.info("computing the reference-loss cache for %d steps", total_steps)
    write_reference_losses(build_stream_spec(configs["proxy_live"], plan), reference_path, cache_prefix,
                           bf16=use_bf16(configs["proxy_live"].train, torch.cuda.is_available()))
    return _framework_loops(configs, env, plan, total_steps)


MIXING_LOOPS = ("static", "ado", "odm")
# ADO in the timed steps: a fit exists (made once after the warm-up steps from their few points), so every step
# runs the whole update (history, credit, preference, new weights); refits themselves are timed apart, at the
# reference's size (REFERENCE_FIT_*), and amortised over the reference's refit interval.
BENCH_ADO = {"ignore_steps": 0, "fit_stride": 1, "smoothing_window": 3, "smoothing_order": 1, "min_fit_points": 3,
             "refit_interval": 10**9}
REFERENCE_FIT_DOMAINS, REFERENCE_FIT_STEPS, REFERENCE_REFIT_INTERVAL = 22, 60_000, 1000


def _mixing_loops(experiment_dict: dict, env, plan, workdir: str, total_steps: int):
    """The three Trainers of ``--mode mixing``; returns (loops, trainers).

    static: the default mixture (Megatron's blend, uniform weights). ado, odm: the online policies from a uniform
    prior, moving from the first step (no warm-up), drawing every step's batch through MixtureSampler. Same
    preset, seed, data and layout.
    """
    online = {"prior": "uniform", "warmup_steps": 0}
    configs = {
        "static": config_from_dict({**experiment_dict, "run_dir": os.path.join(workdir, "run-static")}),
        "ado": config_from_dict({**experiment_dict, "run_dir": os.path.join(workdir, "run-ado"),
                                 "mixing": {**online, "method": "ado", "ado": BENCH_ADO}}),
        "odm": config_from_dict({**experiment_dict, "run_dir": os.path.join(workdir, "run-odm"),
                                 "mixing": {**online, "method": "odm", "odm": {"smoothing": 0.5}}}),
    }
    return _framework_loops(configs, env, plan, total_steps)


def reference_size_fit_seconds(repeats: int = 3) -> dict:
    """One ADO refit at the reference's scale: 22 domains, a 60k-step loss history, smoothed (Savitzky-Golay,
    window 101) and fitted at every 10th step from step 1000 (5,900 points). Best of ``repeats`` runs; synthetic
    power-law curves with noise."""
    from scipy.signal import savgol_filter

    from megadoremi.data.mixing.power_law import fit_power_laws

    rng = np.random.default_rng(0)
    sequences = np.arange(1, REFERENCE_FIT_STEPS + 1) * 256.0
    alpha = rng.uniform(0.1, 0.45, REFERENCE_FIT_DOMAINS)
    log_beta = np.minimum(np.log(rng.uniform(0.3, 2.0, REFERENCE_FIT_DOMAINS)) + alpha * math.log(256e3), 6.4)
    curves = rng.uniform(2.0, 4.0, REFERENCE_FIT_DOMAINS)[:, None] + np.exp(log_beta)[:, None] * sequences ** -alpha[:, None]
    history = (curves * np.exp(rng.normal(0, 0.01, curves.shape))).T  # (steps, K)
    rows = np.arange(1000, REFERENCE_FIT_STEPS, 10)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        smoothed = savgol_filter(history, 101, 3, axis=0, mode="interp")
        fit_power_laws(sequences[rows], smoothed[rows].T)
        best = min(best, time.perf_counter() - started)
    return {"seconds": best, "domains": REFERENCE_FIT_DOMAINS, "history_steps": REFERENCE_FIT_STEPS,
            "points": int(rows.size), "threads": torch.get_num_threads()}


def run_benchmark(bench: TrainBenchConfig, env) -> dict | None:
    """Run the mode's loops on every rank; returns the result on rank 0 (None elsewhere)."""
    bench.validate()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    bf16 = bench.precision == "bf16" or (bench.precision == "auto" and cuda)
    total_steps = bench.warmup_steps + bench.steps
    temporary = bench.workdir is None
    workdir = _broadcast(tempfile.mkdtemp(prefix="megadoremi-bench-") if env.rank == 0 and temporary else None) \
        if temporary else os.path.abspath(bench.workdir)
    trainers = []
    try:
        vocab_size = bench.vocab_size or DEFAULT_VOCAB_SIZE
        data_parallel = env.world_size // bench.pipeline_stages if env.world_size % bench.pipeline_stages == 0 else 1
        global_batch = bench.micro_batch_size * bench.grad_accum * data_parallel
        domains = SYNTHETIC_DOMAINS if bench.data == "synthetic" else CORPUS_DOMAINS
        # Train split 90%, Megatron's 0.5% surplus and the blend's rounding: ask for 25% more than one pass.
        tokens_per_domain = math.ceil(1.25 * total_steps * global_batch * (bench.seq_length + 1) / len(domains))
        data = None
        if env.rank == 0:
            logger.info("writing %s data (vocabulary %d) under %s", bench.data, vocab_size, workdir)
            if bench.data == "synthetic":
                data = write_synthetic_data(workdir, vocab_size, tokens_per_domain, bench.seq_length + 1, bench.seed)
            else:
                data = write_corpus_data(workdir, vocab_size, tokens_per_domain, seed=0)
        data = _broadcast(data)
        experiment_dict = _experiment_dict(bench, data, workdir, total_steps)
        experiment = config_from_dict(experiment_dict)
        plan = resolve_batch_plan(experiment.train, experiment.parallel, env.world_size)
        try:
            if bench.mode == "proxy":
                loops, trainers = _proxy_loops(bench, experiment_dict, env, plan, workdir, total_steps)
            elif bench.mode == "mixing":
                loops, trainers = _mixing_loops(experiment_dict, env, plan, workdir, total_steps)
            else:
                loops, trainers = _overhead_loops(experiment, env, plan, device, bf16, total_steps)
            dtype = torch.bfloat16 if bf16 else torch.float32
            gemm_size, gemm_repeats = (8192, 20) if cuda else (1536, 6)
            gemm_size = bench.gemm_size or gemm_size
            _barrier()
            load_before = _load_average()
            gemm = [measure_matmul_flops(device, dtype, gemm_size, gemm_repeats)]
            logger.info("warmup: %d step(s) per loop; timing %d step(s) per loop in blocks of %d, the order "
                        "reversed every block (%s)", bench.warmup_steps, bench.steps, bench.block_steps,
                        ", ".join(loops))
            warmup = run_blocks(loops, range(0, bench.warmup_steps), max(1, bench.warmup_steps), _barrier)
            ado_fit = None
            if bench.mode == "mixing":  # ADO's first fit, from the warm-up steps' losses (collective)
                ado_trainer = trainers[MIXING_LOOPS.index("ado")]
                fit_started = time.perf_counter()
                if not ado_trainer.mixture.refit(ado_trainer.next_step - 1):
                    raise RuntimeError("bench_train --mode mixing: ADO's fit after the warm-up steps failed")
                ado_fit = time.perf_counter() - fit_started
            timed = run_blocks(loops, range(bench.warmup_steps, total_steps), bench.block_steps, _barrier)
            _barrier()
            gemm.append(measure_matmul_flops(device, dtype, gemm_size, gemm_repeats))
        finally:
            for trainer in trainers:
                trainer.metrics.close()
        losses = {name: {r["step"]: r["loss"] for r in warmup[name] + timed[name]} for name in loops}
        gathered = _all_gather({"timed": timed, "gemm_flops": max(g[0] for g in gemm),
                                "gemm_flops_per_cpu_second": max(g[1] for g in gemm), "losses": losses,
                                "load_average": [load_before, _load_average()]})
        _barrier()  # every rank is done with the files before rank 0 removes them
    finally:
        if temporary and env.rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)
    if env.rank != 0:
        return None
    if bench.mode == "proxy":
        return _proxy_result(bench, env, trainers, experiment, plan, device, bf16, gathered, gemm_size)
    if bench.mode == "mixing":
        return _mixing_result(bench, env, trainers, experiment, plan, device, bf16, gathered, gemm_size, ado_fit)
    return _result(bench, env, trainers[0], experiment, plan, device, bf16, gathered, gemm_size)


def _common_result(bench, env, trainer, experiment, plan, device, bf16, gathered, gemm_size) -> dict:
    """Run description, FLOPs and the peak: the fields both modes report."""
    import deepspeed

    model_config = trainer.model_config
    flops = flops_per_token(model_config, plan.seq_length)
    device_name = _device_name(device)
    measured_tflops = sum(rank["gemm_flops"] for rank in gathered) / 1e12  # all ranks at once
    precision = "bf16" if bf16 else "fp32"
    spec = lookup_peak_tflops(device_name, bf16) if device.type == "cuda" else None
    if bench.peak_tflops is not None:
        peak_total, source = bench.peak_tflops * env.world_size, "--peak-tflops"
    elif spec is not None:
        peak_total, source = spec * env.world_size, f"spec sheet: {device_name}, {precision} dense"
    else:
        peak_total = measured_tflops
        source = (f"measured in this run: best {precision} {gemm_size}^3 GEMM on each of {env.world_size} rank(s) "
                  "at once, summed (no vendor peak for this device; MFU is relative to the achievable GEMM rate)")
    return {
        "benchmark": "megadoremi train_bench", "mode": bench.mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]), "launcher": env.launcher,
        "world_size": env.world_size, "device": device_name, "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "deepspeed_version": deepspeed.__version__,
        "python_version": platform.python_version(),
        "preset": bench.preset, "precision": precision, "data": bench.data,
        "activation_checkpointing": bench.activation_checkpointing,
        "vocab_size": model_config.vocab_size, "padded_vocab_size": model_config.padded_vocab_size,
        "num_parameters": model_config.num_parameters(),
        "num_parameters_nonembedding": model_config.num_parameters(embedding=False),
        "seq_length": plan.seq_length, "micro_batch_size": plan.micro_batch_size, "grad_accum": plan.grad_accum,
        "data_parallel_size": plan.data_parallel_size, "pipeline_stages": plan.pipeline_stages,
        "zero_stage": experiment.parallel.zero_stage, "global_batch_size": plan.global_batch_size,
        "tokens_per_step": plan.tokens_per_step, "steps": bench.steps, "warmup_steps": bench.warmup_steps,
        "block_steps": bench.block_steps, "log_interval": bench.log_interval,
        "flops_formula": FLOPS_FORMULA, "matmul_parameters": flops.matmul_parameters,
        "flops_per_token": flops.total, "dense_flops_per_token": flops.dense,
        "attention_flops_per_token": flops.attention,
        "peak_tflops_total": peak_total, "peak_tflops_per_device": peak_total / env.world_size,
        "peak_source": source, "measured_gemm_tflops_total": measured_tflops,
        # Per CPU-second rates (CPU only): FLOPs a rank gets done per second of its own CPU time, over what the
        # GEMM gets. Other processes on a shared host stretch wall time, not CPU time, so this MFU resists them.
        "measured_gemm_tflops_per_cpu_second":
            statistics.median(rank["gemm_flops_per_cpu_second"] for rank in gathered) / 1e12,
        "load_average_1min": gathered[0]["load_average"], "num_cpu_cores": os.cpu_count(),
    }


def _side_stats(name: str, result: dict, gathered: list, device: torch.device) -> dict:
    """Step time (slowest rank per step, median over steps), tokens/s, TFLOP/s, MFU and the part breakdown."""
    records = [rank["timed"][name] for rank in gathered]
    seconds = _per_step_max(records, lambda record: record["seconds"])
    step_time_s = statistics.median(seconds)
    tokens_per_second = result["tokens_per_step"] / step_time_s
    peak, flops_total = result["peak_tflops_total"], result["flops_per_token"]
    causal = result["dense_flops_per_token"] + result["attention_flops_per_token"] / 2
    side = {
        "step_time_s": step_time_s, "step_time_s_min": min(seconds), "step_time_s_max": max(seconds),
        "step_times_s": seconds,
        # This process's CPU time per step (all its threads): what the step costs without the waits that other
        # work on a shared host adds; equals the wall time on an idle host with one thread per rank.
        "cpu_time_s": statistics.median(_per_step_max(records, lambda record: record["cpu_seconds"])),
        "tokens_per_second": tokens_per_second,
        "achieved_tflops": tokens_per_second * flops_total / 1e12,
        "mfu": tokens_per_second * flops_total / 1e12 / peak,
        "mfu_causal_attention": tokens_per_second * causal / 1e12 / peak,
    }
    flops_per_rank_step = flops_total * result["tokens_per_step"] / result["world_size"]
    side["mfu_cpu_time"] = flops_per_rank_step / side["cpu_time_s"] / (
        result["measured_gemm_tflops_per_cpu_second"] * 1e12) if device.type == "cpu" else None
    parts = records[0][0]["parts"]
    if parts:
        side["breakdown_s"] = {
            part: statistics.median(_per_step_max(records, lambda record, part=part: record["parts"][part]))
            for part in parts
        }
    return side


def _ratios(result: dict, prefix: str, numerator: dict, denominator: dict) -> None:
    """Step-time ratio of medians, median of same-step pairs (resists load that drifts), and of CPU time."""
    result[prefix] = numerator["step_time_s"] / denominator["step_time_s"]
    result[prefix + "_paired"] = statistics.median(
        a / b for a, b in zip(numerator["step_times_s"], denominator["step_times_s"]))
    result[prefix + "_cpu_time"] = numerator["cpu_time_s"] / denominator["cpu_time_s"]


def _result(bench, env, trainer, experiment, plan, device, bf16, gathered, gemm_size) -> dict:
    result = _common_result(bench, env, trainer, experiment, plan, device, bf16, gathered, gemm_size)
    sides = {name: _side_stats(name, result, gathered, device) for name in ("framework", "bare")}
    result.update({key: sides["framework"][key] for key in ("tokens_per_second", "step_time_s", "mfu",
                                                            "mfu_causal_attention", "achieved_tflops")})
    result["framework"], result["bare"] = sides["framework"], sides["bare"]
    _ratios(result, "ratio_framework_over_bare", sides["framework"], sides["bare"])
    # With one rank both loops do the same arithmetic: their losses agree (a check that the work is the same).
    losses = gathered[0]["losses"]
    result["loss_max_abs_diff"] = max(abs(losses["framework"][s] - losses["bare"][s]) for s in losses["bare"]) \
        if env.world_size == 1 else None
    result["includes"] = {
        "framework": "Trainer.step (get_lr, read + collate from the datasets, to device, forward, backward, "
                     "engine.step, statistics all-reduce, objective and mixture end of step, metrics every "
                     "log_interval), Trainer.stop_requested (stop-flag all-reduce)",
        "bare": "list lookup of device-resident batches, forward, backward, clip_grad_norm_, AdamW.step, "
                "zero_grad, LambdaLR.step, float(loss); no communication (per-rank copy when world_size > 1)",
    }
    return result


PROXY_LOOPS = ("plain", "proxy_live", "proxy_cached")


def _proxy_result(bench, env, trainers, experiment, plan, device, bf16, gathered, gemm_size) -> dict:
    result = _common_result(bench, env, trainers[0], experiment, plan, device, bf16, gathered, gemm_size)
    sides = {name: _side_stats(name, result, gathered, device) for name in PROXY_LOOPS}
    result.update(sides)
    _ratios(result, "ratio_proxy_live_over_plain", sides["proxy_live"], sides["plain"])
    _ratios(result, "ratio_proxy_cached_over_plain", sides["proxy_cached"], sides["plain"])
    # The live reference adds one forward of the proxy's shape per micro-batch: (fwd + bwd + fwd) / (fwd + bwd)
    # in model FLOPs, 4/3 under the 1 : 2 forward : backward convention.
    result["flops_ratio_live_reference"] = 4.0 / 3.0
    result["proxy_objective"] = experiment.doremi.objective
    result["proxy_order"] = trainers[1].objective.order
    # Live and cached reference give the proxy the same numbers: the two proxies' losses agree, step by step.
    losses = gathered[0]["losses"]
    result["loss_max_abs_diff_live_vs_cached"] = max(
        abs(losses["proxy_live"][step] - losses["proxy_cached"][step]) for step in losses["proxy_live"])
    result["final_doremi_alpha"] = {name: trainer.objective.state.weights.tolist()
                                    for name, trainer in zip(PROXY_LOOPS[1:], trainers[1:])}
    result["includes"] = {
        "plain": "the Trainer step of a normal run (as --mode overhead's framework loop)",
        "proxy_live": "the same plus the DoReMi proxy: reference-model forward on every micro-batch, per-domain "
                      "excess-loss and token-count all-reduces, alpha update, alpha-weighted loss, trajectory append",
        "proxy_cached": "as proxy_live, with the reference losses read from the memory-mapped cache instead",
    }
    return result


def _mixing_result(bench, env, trainers, experiment, plan, device, bf16, gathered, gemm_size, ado_fit) -> dict:
    result = _common_result(bench, env, trainers[0], experiment, plan, device, bf16, gathered, gemm_size)
    sides = {name: _side_stats(name, result, gathered, device) for name in MIXING_LOOPS}
    result.update(sides)
    _ratios(result, "ratio_ado_over_static", sides["ado"], sides["static"])
    _ratios(result, "ratio_odm_over_static", sides["odm"], sides["static"])
    fit = reference_size_fit_seconds()
    result["ado_fit_in_run_s"] = ado_fit
    result["ado_refit_reference_size"] = fit
    # A refit every REFERENCE_REFIT_INTERVAL steps, spread over them, on top of the measured ADO step.
    result["ratio_ado_over_static_amortised"] = (sides["ado"]["step_time_s"] + fit["seconds"]
                                                 / REFERENCE_REFIT_INTERVAL) / sides["static"]["step_time_s"]
    result["final_mixing_weights"] = {name: trainer.stream.weights.tolist()
                                      for name, trainer in zip(MIXING_LOOPS[1:], trainers[1:])}
    result["includes"] = {
        "static": "the Trainer step of a run with the static mixture (Megatron's blend)",
        "ado": "the same with ADO: MixtureSampler draws, loss history, credit, preference, new weights every step "
               "(the fit exists; refits timed apart at the reference's size and amortised over 1000 steps)",
        "odm": "the same with ODM: MixtureSampler draws, reward estimates, new weights every step",
    }
    return result


def _report_header(result: dict) -> list[str]:
    return [
        f"megadoremi training benchmark ({result.get('mode', 'overhead')})  {result['date'][:19]}Z  torch {result['torch_version']}  "
        f"deepspeed {result['deepspeed_version']}",
        f"device: {result['device']} x {result['world_size']} rank(s) ({result['launcher']}), "
        f"{result['num_threads']} thread(s)/rank, {result['precision']}",
        f"model: preset {result['preset']}, {result['num_parameters'] / 1e6:.2f}M parameters "
        f"({result['num_parameters_nonembedding'] / 1e6:.2f}M non-embedding), vocabulary {result['vocab_size']} "
        f"({result['data']} data)",
        f"layout: ZeRO {result['zero_stage']}, {result['pipeline_stages']} pipeline x "
        f"{result['data_parallel_size']} data-parallel; micro {result['micro_batch_size']} x accumulation "
        f"{result['grad_accum']} = global {result['global_batch_size']} x {result['seq_length']} tokens = "
        f"{result['tokens_per_step']} tokens/step",
        f"timing: median of {result['steps']} steps per loop after {result['warmup_steps']} warmup, blocks of "
        f"{result['block_steps']} steps, the loops' order reversed every block",
        "",
        f"{'':24}{'step time':>12}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>9}{'MFU causal':>12}"
        f"{'CPU time':>12}{'MFU/CPU-s':>11}",
    ]


def _side_line(label: str, side: dict) -> str:
    cpu_mfu = "n/a" if side["mfu_cpu_time"] is None else f"{side['mfu_cpu_time']:.2%}"
    return (f"{label:24}{side['step_time_s'] * 1e3:>10.1f}ms{side['tokens_per_second']:>12.0f}"
            f"{side['achieved_tflops']:>10.4f}{side['mfu']:>9.2%}{side['mfu_causal_attention']:>12.2%}"
            f"{side['cpu_time_s'] * 1e3:>10.1f}ms{cpu_mfu:>11}")


def _ratio_line(result: dict, prefix: str, label: str, limit: str = "") -> str:
    return (f"ratio {label} step time: {result[prefix]:.3f} (of medians), {result[prefix + '_paired']:.3f} "
            f"(median of same-step pairs), {result[prefix + '_cpu_time']:.3f} (process CPU time){limit}")


def _breakdown_line(label: str, side: dict) -> str:
    return f"{label} step breakdown (median ms): " + " | ".join(
        f"{part} {seconds * 1e3:.2f}" for part, seconds in side["breakdown_s"].items())


def _report_footer(result: dict) -> list[str]:
    return [
        f"host load average (1 min) before / after timing: "
        + " / ".join("n/a" if x is None else f"{x:.2f}" for x in result["load_average_1min"])
        + (f"  WARNING: above the {result['num_cpu_cores']} cores, other work competed with this run"
           if any(x is not None and x > result["num_cpu_cores"] for x in result["load_average_1min"]) else ""),
        "",
        f"FLOPs/token {result['flops_per_token']:,} = 6 x {result['matmul_parameters']:,} (dense "
        f"{result['dense_flops_per_token']:,}) + attention {result['attention_flops_per_token']:,}",
        f"  {result['flops_formula']}",
        f"peak {result['peak_tflops_total']:.4f} TFLOP/s total ({result['peak_tflops_per_device']:.4f} per rank): "
        f"{result['peak_source']}",
        f"MFU/CPU-s: FLOPs per second of the rank's own CPU time over the same GEMM's "
        f"({result['measured_gemm_tflops_per_cpu_second']:.4f} TFLOP per CPU-second); resists other load",
    ]


def format_report(result: dict) -> str:
    """The human-readable table."""
    lines = _report_header(result)
    if result.get("mode") == "mixing":
        labels = {"static": "static mixture", "ado": "ADO", "odm": "ODM"}
        fit = result["ado_refit_reference_size"]
        lines += [_side_line(labels[name], result[name]) for name in MIXING_LOOPS]
        lines += [
            _ratio_line(result, "ratio_ado_over_static", "ADO / static"),
            _ratio_line(result, "ratio_odm_over_static", "ODM / static"),
            f"ADO refit at the reference's size ({fit['domains']} domains, {fit['history_steps']}-step history, "
            f"{fit['points']} points, {fit['threads']} thread(s)): {fit['seconds']:.3f} s; amortised over "
            f"{REFERENCE_REFIT_INTERVAL} steps: ADO / static {result['ratio_ado_over_static_amortised']:.4f}",
            *(_breakdown_line(labels[name], result[name]) for name in MIXING_LOOPS),
        ]
        return "\n".join(lines + _report_footer(result))
    if result.get("mode", "overhead") == "proxy":
        labels = {"plain": "plain (Trainer)", "proxy_live": "proxy, live reference",
                  "proxy_cached": "proxy, cached reference"}
        lines += [_side_line(labels[name], result[name]) for name in PROXY_LOOPS]
        lines += [
            _ratio_line(result, "ratio_proxy_live_over_plain", "proxy (live) / plain",
                        f"; FLOPs ratio {result['flops_ratio_live_reference']:.3f}"),
            _ratio_line(result, "ratio_proxy_cached_over_plain", "proxy (cached) / plain", "; FLOPs ratio 1"),
            *(_breakdown_line(labels[name], result[name]) for name in PROXY_LOOPS),
            f"proxy: objective {result['proxy_objective']}, order {result['proxy_order']}; losses live vs cached: "
            f"max |difference| {result['loss_max_abs_diff_live_vs_cached']:.2e}",
            "MFU counts the trained model's FLOPs only (the reference forward is the proxy's overhead)",
        ]
        return "\n".join(lines + _report_footer(result))
    fw, bare = result["framework"], result["bare"]
    lines += [
        _side_line("framework (Trainer)", fw), _side_line("bare PyTorch loop", bare),
        _ratio_line(result, "ratio_framework_over_bare", "framework / bare"),
        _breakdown_line("framework", fw),
    ]
    lines += _report_footer(result)
    if result["loss_max_abs_diff"] is not None:
        lines.append(f"losses framework vs bare: max |difference| {result['loss_max_abs_diff']:.2e} ("
                     + ("same arithmetic)" if result["precision"] == "fp32" else
                        "bf16 weights vs fp32 weights under autocast round differently)"))
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="bench_train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Training tokens/s and MFU of a preset and layout, and the framework / bare-loop step-time "
                    "ratio. Runs under python (one rank), torchrun, deepspeed, srun or mpiexec.",
        epilog=__doc__)
    defaults = TrainBenchConfig()
    parser.add_argument("--mode", default=defaults.mode,
                        help="overhead: the Trainer step against a bare PyTorch loop; proxy: a DoReMi proxy step "
                             "(live reference model, and cached reference losses) against a plain step; mixing: "
                             "ADO and ODM steps against a static-mixture step, and one ADO refit at the reference's "
                             "size (default: %(default)s)")
    parser.add_argument("--preset", default=defaults.preset, help="model preset: " + ", ".join(PRESETS))
    parser.add_argument("--seq-length", type=int, default=defaults.seq_length)
    parser.add_argument("--micro-batch-size", type=int, default=defaults.micro_batch_size)
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed steps per loop")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="untimed steps per loop")
    parser.add_argument("--block-steps", type=int, default=defaults.block_steps,
                        help="steps per block of the ABBA alternation (default: %(default)s)")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=defaults.zero_stage)
    parser.add_argument("--pipeline-stages", type=int, default=defaults.pipeline_stages)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"synthetic data: token range; corpus data: tokenizer size (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=defaults.precision,
                        help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s per device (default: spec sheet of a known GPU, else a measured GEMM)")
    parser.add_argument("--data", choices=("synthetic", "corpus"), default=defaults.data,
                        help="synthetic: random tokens; corpus: demo corpus + trained tokenizer (both through the "
                             "real indexed / blended dataset path)")
    parser.add_argument("--log-interval", type=int, default=defaults.log_interval,
                        help="the trainer's train.log_interval (default %(default)s, as in a run)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block's activations in the backward (both loops)")
    parser.add_argument("--gemm-size", type=int, default=None,
                        help="side of the square GEMM measured for the peak (default 8192 on a GPU, 1536 on CPU)")
    parser.add_argument("--workdir", default=None, help="where data and the run directory go (default: a temp dir)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the result as JSON (- for stdout)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send file descriptor 1 to stderr meanwhile: DeepSpeed prints to stdout, which holds only the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    """Parse, set up the process group, run, report, tear down."""
    args = build_parser().parse_args(argv)
    fields = {key: value for key, value in vars(args).items() if key not in ("json", "local_rank")}
    bench = TrainBenchConfig(**fields)
    try:
        bench.validate()
    except ConfigError as error:
        print(f"bench_train: {error}", file=sys.stderr)
        return 2

    from megadoremi.distributed.env import discover_environment, init_distributed, prepare_process_environment

    prepare_process_environment()

    env = discover_environment()
    configure_logging(rank=env.rank)
    try:
        with _stdout_to_stderr():
            init_distributed(env)
            result = run_benchmark(bench, env)
        if result is not None:
            if args.json == "-":
                print(json.dumps(result, indent=1))
            else:
                print(format_report(result))
                if args.json:
                    with open(args.json, "w") as handle:
                        json.dump(result, handle, indent=1)
        _barrier()
    except ConfigError as error:
        print(f"bench_train: config error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
