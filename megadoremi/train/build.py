"""From config sections to the training loop's parts: the model shape, the mixture policy, the training-stream
recipe and the loss objective. The one place that knows which objectives exist."""

import torch

from megadoremi.config import ConfigError, ExperimentConfig
from megadoremi.data.mixing import MixturePolicy, build_mixture_policy
from megadoremi.data.stream import TrainStreamSpec, train_stream_spec
from megadoremi.distributed.engine import TrainingEngine
from megadoremi.distributed.plan import BatchPlan
from megadoremi.distributed.stats import broadcast_array
from megadoremi.doremi.proxy import DoReMiObjective
from megadoremi.doremi.reference import build_reference
from megadoremi.model.gpt import GPTConfig
from megadoremi.model.presets import gpt_config_from_preset
from megadoremi.train.objective import LanguageModelingObjective


def build_model_config(config: ExperimentConfig) -> GPTConfig:
    """The GPT shape: the preset, its overrides, the vocabulary (``model.vocab_size`` or the tokenizer's)."""
    model = config.model
    vocab_size = model.vocab_size
    if vocab_size is None:
        if not config.data.tokenizer_model:
            raise ConfigError("model.vocab_size or data.tokenizer_model is required to size the embedding")
        from megadoremi.data.tokenizer import Tokenizer

        vocab_size = Tokenizer(config.data.tokenizer_model).vocab_size
    overrides = {k: v for k, v in (("mlp", model.mlp), ("norm", model.norm),
                                   ("tied_embeddings", model.tied_embeddings)) if v is not None}
    return gpt_config_from_preset(model.preset, vocab_size, config.train.seq_length, **overrides)


def build_mixture(config: ExperimentConfig, rank: int = 0, device="cpu") -> MixturePolicy:
    """The mixture policy of ``mixing`` over ``data.domains`` (``data.weights``: the static mixture); a curve fit
    runs on rank 0 and is broadcast from there over ``device``."""
    try:
        return build_mixture_policy(config.mixing, config.data, fits=rank == 0,
                                    broadcast=lambda array: broadcast_array(array, device))
    except ValueError as error:
        raise ConfigError(str(error)) from None


def build_stream_spec(config: ExperimentConfig, plan: BatchPlan, policy: MixturePolicy | None = None
                      ) -> TrainStreamSpec:
    """The training stream's recipe (the trainer's, and the one a reference-loss cache is computed for)."""
    policy = policy or build_mixture(config)
    return train_stream_spec(config.data, config.train, policy, plan.global_batch_size, config.mixing.sampler)


def build_objective(config: ExperimentConfig, model_config: GPTConfig, spec: TrainStreamSpec,
                    trained: TrainingEngine, plan: BatchPlan, device: torch.device):
    """The loss objective: the DoReMi proxy when ``doremi.enabled``, else plain language modelling."""
    if not config.doremi.enabled:
        return LanguageModelingObjective()
    zero3 = trained.ds_config if trained.zero_stage == 3 else None
    reference = build_reference(config.doremi, model_config, spec.identity(), device,
                                torch.bfloat16 if trained.bf16 else torch.float32, zero3,
                                computes_losses=trained.is_last_stage)
    return DoReMiObjective(config.doremi, spec.domain_names, model_config.vocab_size, spec.weights, reference, plan,
                           data_parallel_group=trained.data_parallel_group, is_last_stage=trained.is_last_stage,
                           device=device, data_prefixes=spec.domains)
