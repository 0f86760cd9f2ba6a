"""Thin wrapper: see megadoremi.bench.train_bench."""

import sys

from megadoremi.bench.train_bench import main

if __name__ == "__main__":
    sys.exit(main())
