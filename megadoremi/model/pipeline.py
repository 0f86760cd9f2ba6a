"""The GPT as a DeepSpeed ``PipelineModule``: the same Embedding / Block / Head modules, one layer per spec.

Layers: embedding, blocks 1..L, final norm (+ output projection when untied), and with tied embeddings the
embedding again as a ``TiedLayerSpec`` whose forward computes the logits (DeepSpeed keeps the two copies in
sync by all-reducing their gradients). Stages are partitioned by parameter count; the loss runs on the last
stage.
"""

import torch
from torch import nn

from megadoremi.model.gpt import Block, Embedding, GPTConfig, Head

TIED_KEY = "embedding"


class PipeFinal(nn.Module):
    """Final norm, and the output projection when embeddings are not tied."""

    def __init__(self, config: GPTConfig, seed: int = 0):
        super().__init__()
        self.head = Head(config, seed)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.head.norm(hidden)
        return self.head.proj(hidden) if self.head.proj is not None else hidden


def _embed_forward(module: Embedding, tokens: torch.Tensor) -> torch.Tensor:
    return module(tokens)


def _logits_forward(module: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    return module.logits(hidden)


def pipeline_layer_specs(config: GPTConfig, seed: int = 0) -> list:
    """LayerSpecs of the pipeline form of ``GPT(config, seed)`` (identical initial weights)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    config.validate()
    if config.tied_embeddings:
        specs = [TiedLayerSpec(TIED_KEY, Embedding, config, seed, forward_fn=_embed_forward)]
    else:
        specs = [LayerSpec(Embedding, config, seed)]
    specs += [LayerSpec(Block, config, i + 1, seed) for i in range(config.num_layers)]
    specs.append(LayerSpec(PipeFinal, config, seed))
    if config.tied_embeddings:
        specs.append(TiedLayerSpec(TIED_KEY, Embedding, config, seed, forward_fn=_logits_forward))
    return specs


def build_pipeline_model(config: GPTConfig, num_stages: int, loss_fn, seed: int = 0,
                         activation_checkpoint_interval: int = 0):
    """A ``deepspeed.pipe.PipelineModule``; torch.distributed must already be initialised."""
    from deepspeed.pipe import PipelineModule

    return PipelineModule(
        layers=pipeline_layer_specs(config, seed),
        num_stages=num_stages,
        loss_fn=loss_fn,
        partition_method="parameters",
        activation_checkpoint_interval=activation_checkpoint_interval,
    )
