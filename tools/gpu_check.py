"""Thin wrapper: see megadoremi.bench.gpu_check (``make gpu-check``)."""

import sys

from megadoremi.bench.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
