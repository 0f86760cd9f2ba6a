"""Experiment configuration: one dataclass per component, YAML in and out, dotted overrides, one ConfigError.

``load_config("configs/tiny/main.yaml", ["--train.steps=20", "--parallel.zero_stage=3"])`` reads the YAML,
applies the overrides (values parsed as YAML scalars), checks every key and type, runs each section's
``validate()`` and returns an ``ExperimentConfig``. Unknown keys, wrong types and impossible values fail here,
before any process group or model exists, with the dotted field name and the value in the message.
"""

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from megadoremi.utils.cli import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the field and the value."""


@dataclass
class ModelConfig:
    preset: str = "tiny"
    vocab_size: int | None = None  # None: the tokenizer's (data.tokenizer_model)
    mlp: str | None = None  # gelu | swiglu (None: the preset's)
    norm: str | None = None  # layernorm | rmsnorm
    tied_embeddings: bool | None = None
    activation_checkpointing: bool = False

    def validate(self) -> None:
        from megadoremi.model.presets import PRESETS

        if self.preset.lower() not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.mlp not in (None, "gelu", "swiglu"):
            raise ConfigError(f"model.mlp: must be gelu or swiglu, got {self.mlp!r}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size: must be positive, got {self.vocab_size}")
        if self.norm not in (None, "layernorm", "rmsnorm"):
            raise ConfigError(f"model.norm: must be layernorm or rmsnorm, got {self.norm!r}")


@dataclass
class DataConfig:
    domains: dict[str, str] = field(default_factory=dict)  # domain name -> dataset prefix
    weights: str | dict[str, float] | None = None  # weights JSON path or inline mapping; None: uniform
    tokenizer_model: str | None = None
    split: str = "969,30,1"
    cache_dir: str | None = None  # sample-index cache; None: next to each dataset (or a temp dir if read-only)

    def validate(self) -> None:
        if not self.domains:
            raise ConfigError("data.domains: at least one domain (name: dataset prefix) is required")
        for name, prefix in self.domains.items():
            if not isinstance(prefix, str) or not prefix:
                raise ConfigError(f"data.domains.{name}: expected a dataset prefix, got {prefix!r}")
        if isinstance(self.weights, dict):
            unknown = sorted(set(self.weights) - set(self.domains))
            if unknown:
                raise ConfigError(f"data.weights: unknown domain(s) {unknown}; known: {sorted(self.domains)}")


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    seq_length: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_fraction: float = 0.06
    decay: str = "exponential"  # exponential | cosine | constant
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    log_interval: int = 1
    exit_interval: int = 0  # checkpoint and exit after a step divisible by this (Megatron's --exit-interval)
    divergence_patience: int = 3  # stop (exit 3, no final.json) after this many steps in a row with a non-finite
    # loss or gradient norm; no checkpoint is written meanwhile (fp16 loss-scale skips do not count)

    def validate(self) -> None:
        if self.divergence_patience < 1:
            raise ConfigError(f"train.divergence_patience: must be >= 1, got {self.divergence_patience}")
        if self.exit_interval < 0:
            raise ConfigError(f"train.exit_interval: must be >= 0, got {self.exit_interval}")
        for name in ("steps", "micro_batch_size", "grad_accum", "seq_length", "log_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: must be positive, got {getattr(self, name)}")
        if not 0 < self.lr:
            raise ConfigError(f"train.lr: must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr: must be in [0, train.lr={self.lr}], got {self.min_lr}")
        if self.decay == "exponential" and self.min_lr <= 0:
            raise ConfigError("train.min_lr: exponential decay needs a positive min_lr")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"train.warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if self.decay not in ("exponential", "cosine", "constant"):
            raise ConfigError(f"train.decay: must be exponential, cosine or constant, got {self.decay!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision: must be auto, fp32 or bf16, got {self.precision!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas: expected two values in [0, 1), got {self.betas}")


@dataclass
class ParallelConfig:
    zero_stage: int = 0
    pipeline_stages: int = 1
    ds_config_template: str | None = None  # default: ds_configs/zero{stage}.json shipped with the package
    # Seconds a collective (all-reduce, barrier, rendezvous) waits for the other ranks before it fails the run: a
    # rank whose peer died or whose node dropped off the network stops after this long instead of hanging
    # (docs/cluster.md). torch's default for gloo (NCCL's is 10 min); it must exceed the longest stretch one rank
    # spends alone (rank 0 writing model.pt at the end).
    collective_timeout_s: int = 1800

    def validate(self) -> None:
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"parallel.collective_timeout_s: must be > 0 seconds, got {self.collective_timeout_s}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.pipeline_stages < 1:
            raise ConfigError(f"parallel.pipeline_stages: must be >= 1, got {self.pipeline_stages}")
        if self.pipeline_stages > 1 and self.zero_stage >= 2:
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} with parallel.pipeline_stages={self.pipeline_stages}: "
                "DeepSpeed's pipeline engine supports only ZeRO stage 0 or 1 (stage 2/3 partition gradients "
                "or parameters across the data-parallel group, which the pipeline schedule does not handle); "
                "use zero_stage 1 with pipelining, or pipeline_stages 1 with ZeRO-3"
            )


@dataclass
class EvalConfig:
    interval: int = 0  # steps between evaluations; 0: only at the end
    max_samples_per_domain: int = 4096  # every held-out sample up to this: a standard error of a domain's mean
    # loss below 0.01 nats for a per-sample spread up to 0.64 nats (0.03-0.49 measured on the demo corpus)
    batch_size: int | None = None  # per-rank validation micro-batch; None: train.micro_batch_size (always so
    # with pipeline stages, whose engine needs fixed micro-batch shapes)
    seed: int = 1234  # orders each domain's validation samples: the validation set never depends on train.seed,
    # so runs with different training seeds (and mixtures) are evaluated on the same samples

    def validate(self) -> None:
        if self.interval < 0 or self.max_samples_per_domain <= 0 or (self.batch_size is not None and self.batch_size <= 0):
            raise ConfigError(
                f"eval: interval must be >= 0 and max_samples_per_domain, batch_size > 0; got {self}"
            )


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2
    resume: str | int = "auto"  # auto (the newest sound complete checkpoint, if any) | none | a step | a directory
    export_model: bool = True  # write RUN_DIR/model.pt (consolidated weights) at the end of the run
    verify: bool = True  # SHA-256 of every checkpoint file in its MANIFEST.json when saved, checked before resuming
    # (false: sizes only; see docs/reliability.md for the cost)

    def validate(self) -> None:
        self.resume = str(self.resume)
        if self.resume.lstrip("-").isdigit() and int(self.resume) < 0:
            raise ConfigError(f"checkpoint.resume: a step must be >= 0, got {self.resume}")
        if self.interval < 0:
            raise ConfigError(f"checkpoint.interval: must be >= 0, got {self.interval}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last: must be >= 1, got {self.keep_last}")


@dataclass
class ADOConfig:
    """ADO's hyper-parameters (``mixing.ado.*``); defaults are the authors' Pile settings (MIXING.md)."""

    refit_interval: int = 1000  # steps between power-law refits (t_update)
    ignore_steps: int = 1000  # the first step whose loss enters a fit
    fit_stride: int = 10  # every fit_stride-th step's smoothed loss is a fit point
    min_fit_points: int = 20  # a refit needs this many points (the reference's first fit has one: see ado.py)
    smoothing_window: int = 101  # Savitzky-Golay window over the loss history (steps)
    smoothing_order: int = 3
    credit_decay: float = 0.1  # gamma1: weight of the step's realised shares in the credit h
    credit_exponent: float = 0.5  # s: lambda = h^s
    preference_weight: float = 0.1  # gamma2: weight of the new preference rho in pi
    min_preference: float = 0.01  # delta_min: floor on rho
    alpha_floor: float = 0.05  # floor on the fitted exponent in the forecast slope

    def validate(self) -> None:
        for name in ("refit_interval", "fit_stride", "min_fit_points", "smoothing_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mixing.ado.{name}: must be >= 1, got {getattr(self, name)}")
        if self.ignore_steps < 0:
            raise ConfigError(f"mixing.ado.ignore_steps: must be >= 0, got {self.ignore_steps}")
        if self.smoothing_window % 2 == 0 or not 0 <= self.smoothing_order < self.smoothing_window:
            raise ConfigError(f"mixing.ado.smoothing_window / smoothing_order: the window must be odd and larger "
                              f"than the order, got {self.smoothing_window} / {self.smoothing_order}")
        for name in ("credit_decay", "preference_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"mixing.ado.{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.credit_exponent < 0 or self.alpha_floor < 0:
            raise ConfigError("mixing.ado.credit_exponent and alpha_floor: must be >= 0")


@dataclass
class ODMConfig:
    """ODM's hyper-parameters (``mixing.odm.*``)."""

    smoothing: float | None = None  # a in R <- a R + (1 - a) reward; required: 0.5 (the authors' later runs,
    # the likelier paper value) or 0.9 (their code's argument default)
    variant: str = "smoothed_mean"  # smoothed_mean (the code's) | paper (Exp3, smoothed) | exp3 (cumulative)

    def validate(self) -> None:
        from megadoremi.data.mixing.odm import VARIANTS

        if self.smoothing is not None and not 0 <= self.smoothing < 1:
            raise ConfigError(f"mixing.odm.smoothing: must be in [0, 1), got {self.smoothing}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"mixing.odm.variant: must be one of {', '.join(VARIANTS)}, got {self.variant!r}")


@dataclass
class MixingConfig:
    """How the sampling mixture evolves during the run (``megadoremi.data.mixing``)."""

    method: str = "static"  # static: data.weights for the whole run (Megatron's blend) | schedule | ado | odm
    schedule: str | None = None  # method schedule: JSON {"step": {domain: weight}, ...}, must list step 0
    sampler: str = "stratified"  # dynamic methods draw through MixtureSampler: stratified | random
    prior: str | dict[str, float] = "natural"  # ado / odm: the prior mixture, natural (token shares of the
    # training splits) | uniform | a weights JSON file | {domain: weight}
    warmup_steps: int | None = None  # ado / odm: steps drawn from the prior before the policy may move
    # (None: the method's default, ADO 500, ODM 2000)
    ado: ADOConfig = field(default_factory=ADOConfig)
    odm: ODMConfig = field(default_factory=ODMConfig)

    def validate(self) -> None:
        from megadoremi.data.mixing import METHODS
        from megadoremi.data.sampler import MODES

        if self.method not in METHODS:
            raise ConfigError(f"mixing.method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "schedule" and not self.schedule:
            raise ConfigError("mixing.schedule: required with mixing.method=schedule (a JSON file "
                              '{"0": {domain: weight}, "1000": {...}})')
        if self.method != "schedule" and self.schedule:
            raise ConfigError(f"mixing.schedule: only used with mixing.method=schedule, not {self.method!r}")
        if self.sampler not in MODES:
            raise ConfigError(f"mixing.sampler: must be one of {', '.join(MODES)}, got {self.sampler!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"mixing.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.method == "odm" and self.odm.smoothing is None:
            raise ConfigError("mixing.odm.smoothing: required with mixing.method=odm: 0.5 reproduces the authors' "
                              "later (paper) runs, 0.9 is their code's default")
        self.ado.validate()
        self.odm.validate()


@dataclass
class DoReMiConfig:
    """Group-DRO proxy training (DoReMi). Batches are sampled from data.weights (the reference mixture);
    the domain weights alpha_t only weight the loss."""

    enabled: bool = False
    reference_model: str | None = None  # a reference run directory (its model.pt) or a model.pt file
    reference_losses: str | None = None  # a cache written by tools/compute_reference_losses.py (else: live)
    step_size: float = 1.0
    smoothing: float = 1e-3
    objective: str = "paper"  # paper (Eq. 1) | official (token-weighted, as the official repository)
    order: str = "auto"  # same_step: alpha_t from step t's own batch, before backward (Algorithm 1; one
    # micro-batch per step) | lagged: step t's loss uses alpha_{t-1} | auto: same_step when possible
    initial_weights: str | dict[str, float] | None = None  # alpha_0; None: uniform
    check_consistency: bool = False  # debug: all-gather alpha every step and check every rank agrees

    def validate(self) -> None:
        if not self.enabled:
            return
        if not self.reference_model and not self.reference_losses:
            raise ConfigError("doremi.reference_model: required (or doremi.reference_losses) for a proxy run")
        if self.step_size < 0:
            raise ConfigError(f"doremi.step_size: must be >= 0, got {self.step_size}")
        if not 0 <= self.smoothing <= 1:
            raise ConfigError(f"doremi.smoothing: must be in [0, 1], got {self.smoothing}")
        if self.objective not in ("paper", "official"):
            raise ConfigError(f"doremi.objective: must be paper or official, got {self.objective!r}")
        if self.order == "paper":
            raise ConfigError("doremi.order: 'paper' is now called 'same_step' (alpha_t from step t's own batch, "
                              "updated between forward and backward, as in the paper's Algorithm 1)")
        if self.order not in ("auto", "same_step", "lagged"):
            raise ConfigError(f"doremi.order: must be auto, same_step or lagged, got {self.order!r}")


@dataclass
class ExperimentConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    doremi: DoReMiConfig = field(default_factory=DoReMiConfig)

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("run_dir: required")
        if self.doremi.enabled and self.doremi.order == "same_step" and (
                self.train.grad_accum > 1 or self.parallel.pipeline_stages > 1):
            raise ConfigError(
                "doremi.order=same_step updates alpha between the forward and the backward of the step's only "
                "micro-batch; with train.grad_accum > 1 or pipeline stages the loss of step t must use alpha_{t-1} "
                "(doremi.order=lagged, or auto)")
        if self.doremi.enabled and self.mixing.method != "static":
            raise ConfigError(f"mixing.method={self.mixing.method} with doremi.enabled: the DoReMi proxy samples "
                              "from the fixed reference mixture (data.weights); only alpha changes")
        if self.mixing.method != "static" and self.data.weights is not None:
            raise ConfigError(f"data.weights with mixing.method={self.mixing.method}: the {self.mixing.method} "
                              "policy gives the weights of every step, including step 0; drop one of them")
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        if self.mixing.method == "schedule":
            from megadoremi.data.mixing import load_schedule

            try:  # read now: a bad schedule file fails before any process group or model exists
                load_schedule(self.mixing.schedule, list(self.data.domains))
            except ValueError as error:
                raise ConfigError(str(error)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- building dataclasses from plain data, with type checks -----------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Check ``value`` against the annotation ``tp`` (recursing into dataclasses); ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (section), got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(error)
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, key_type, f"{where}"): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string: accept every spelling of float()
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known keys{' of ' + prefix if prefix else ''}: "
                          f"{', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], object]]:
    """``["--train.steps=20", "--data.weights=w.json"]`` -> [(["train", "steps"], 20), ...] (YAML scalars)."""
    parsed = []
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r}: expected --section.key=value")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: cannot parse the value: {error}") from None
        parsed.append((key.split("."), value))
    return parsed


def _apply(data: dict, path: list[str], value) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def config_from_dict(data: dict, overrides: list[str] = ()) -> ExperimentConfig:
    """Build, override and validate an ExperimentConfig from plain data."""
    data = dict(data or {})
    for path, value in parse_overrides(list(overrides)):
        _apply(data, path, value)
    config = _build(ExperimentConfig, data)
    config.validate()
    return config


def load_config(path: str, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config file; relative dataset / weights paths stay relative to the working directory."""
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def save_config(config: ExperimentConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    from megadoremi.utils.fs import atomic_output

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path, "w") as handle:
        yaml.safe_dump(config.to_dict(), handle, sort_keys=False)
