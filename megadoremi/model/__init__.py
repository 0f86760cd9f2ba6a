"""The GPT model (plain PyTorch, no torch.distributed) and its DeepSpeed pipeline form."""

from megadoremi.model.gpt import GPT, GPTConfig, token_losses
from megadoremi.model.presets import PRESETS, gpt_config_from_preset

__all__ = ["GPT", "GPTConfig", "PRESETS", "gpt_config_from_preset", "token_losses"]
