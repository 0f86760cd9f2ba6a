"""Thin wrapper: see megadoremi.tools.inspect_dataset."""
import sys

from megadoremi.tools.inspect_dataset import main

if __name__ == "__main__":
    sys.exit(main())
