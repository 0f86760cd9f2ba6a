"""The GPT model (plain PyTorch, no torch.distributed), its presets and DeepSpeed pipeline form, the model.pt file
format (``io``) and the FLOPs formula (``flops``)."""

from megadoremi.model.gpt import GPT, GPTConfig, token_losses
from megadoremi.model.presets import PRESETS, gpt_config_from_preset

__all__ = ["GPT", "GPTConfig", "PRESETS", "gpt_config_from_preset", "token_losses"]
