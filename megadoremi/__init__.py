"""megadoremi: DoReMi data-mixture optimisation on a DeepSpeed/Megatron-style GPT trainer."""

import os
import sys

__version__ = "0.1.0"

# DeepSpeed JIT-compiles small C++ ops (on CPU: its shared-memory communication op) into TORCH_EXTENSIONS_DIR.
# Keep them per environment, so two checkouts or virtualenvs never rebuild each other's copy back and forth.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
# torch builds them with whichever `ninja` is first on PATH. A system ninja (1.11: log v5, MurmurHash) and the
# environment's pip ninja (1.13: log v7, another hash) each take the other's build for a different command and
# rebuild it (30-100 s per DeepSpeed start): inside a virtualenv, use the environment's own ninja if it has one.
_bin = os.path.dirname(sys.executable)
if sys.prefix != sys.base_prefix and os.path.exists(os.path.join(_bin, "ninja")) \
        and os.environ.get("PATH", "").split(os.pathsep)[0] != _bin:
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")
