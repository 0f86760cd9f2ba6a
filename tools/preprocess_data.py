"""Thin wrapper: see megadoremi.tools.preprocess_data."""
import sys

from megadoremi.tools.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
