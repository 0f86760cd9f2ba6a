"""megadoremi: DoReMi data-mixture optimisation on a DeepSpeed/Megatron-style GPT trainer."""

import os
import sys

__version__ = "0.1.0"

# DeepSpeed JIT-compiles small C++ ops (on CPU: its shared-memory communication op) into TORCH_EXTENSIONS_DIR.
# Keep them per environment, so two checkouts or virtualenvs never rebuild each other's copy back and forth.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
