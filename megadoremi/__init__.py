"""megadoremi: DoReMi data-mixture optimisation on a DeepSpeed/Megatron-style GPT trainer.

Importing the package changes nothing in the process environment; entry points call
``megadoremi.distributed.env.prepare_process_environment`` before DeepSpeed starts.
"""

__version__ = "0.1.0"
