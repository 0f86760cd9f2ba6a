"""The GPT as a DeepSpeed ``PipelineModule``: the same Embedding / Block / Head modules, one layer per spec.

Layers: embedding, blocks 1..L, final norm (+ output projection when untied), and with tied embeddings the
embedding again as a ``TiedLayerSpec`` whose forward computes the logits (DeepSpeed keeps the two copies in
sync by all-reducing their gradients). Stages are partitioned by parameter count; the loss runs on the last
stage.

Checkpoints: DeepSpeed's ``PipelineModule`` writes one file per layer that has a ``state_dict`` and skips tied
layers (their forward is a function of the tied module), so the tied embedding would be in no file and a resumed
run would restart it from its initial values (ZeRO-1 hides this by copying its fp32 master weights back; ZeRO-0
does not). The module built here also writes each tied module, from the first stage that holds it
(``tied_KEY-model_states.pt``), and every stage holding it loads that file back.
"""

import functools
import os

import torch
from torch import nn

from megadoremi.model.gpt import Block, Embedding, GPTConfig, Head
from megadoremi.utils.cli import UserError

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
    return _pipeline_module_class()(
        layers=pipeline_layer_specs(config, seed),
        num_stages=num_stages,
        loss_fn=loss_fn,
        partition_method="parameters",
        activation_checkpoint_interval=activation_checkpoint_interval,
    )


def tied_checkpoint_path(checkpoint_dir: str, key: str) -> str:
    return os.path.join(checkpoint_dir, f"tied_{key}-model_states.pt")


@functools.cache
def _pipeline_module_class():
    """``PipelineModule`` that also saves and loads its tied modules (see the module docstring)."""
    from deepspeed.pipe import PipelineModule

    class TiedSavingPipelineModule(PipelineModule):
        def save_state_dict(self, save_dir, checkpoint_engine, exclude_frozen_params=False):
            super().save_state_dict(save_dir, checkpoint_engine, exclude_frozen_params)
            if self._grid.data_parallel_id != 0:
                return
            for key, module in self.tied_modules.items():
                first = min(i for i, spec in enumerate(self._layer_specs) if getattr(spec, "key", None) == key)
                if self._local_start <= first < self._local_stop:  # the first stage that holds it writes it
                    state = {name: value.detach().clone() for name, value in module.state_dict().items()}
                    checkpoint_engine.save(state_dict=state, path=tied_checkpoint_path(save_dir, key))

        def load_state_dir(self, load_dir, checkpoint_engine, strict=True):
            super().load_state_dir(load_dir, checkpoint_engine, strict)
            for key, module in self.tied_modules.items():
                path = tied_checkpoint_path(load_dir, key)
                if not os.path.exists(path):
                    raise UserError(f"{path}: missing; this pipeline checkpoint lacks the tied module {key!r} "
                                    "(written before megadoremi saved it), so it cannot be resumed exactly")
                module.load_state_dict(checkpoint_engine.load(path, map_location="cpu"), strict=strict)
            self._synchronize_tied_weights()

    return TiedSavingPipelineModule
