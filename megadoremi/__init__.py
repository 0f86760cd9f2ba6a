"""megadoremi: DoReMi data-mixture optimisation on a DeepSpeed/Megatron-style GPT trainer."""

__version__ = "0.1.0"
