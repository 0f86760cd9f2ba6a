"""Thin wrapper: see megadoremi.tools.merge_datasets."""
import sys

from megadoremi.tools.merge_datasets import main

if __name__ == "__main__":
    sys.exit(main())
