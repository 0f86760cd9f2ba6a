"""Thin wrapper: see megadoremi.tools.export_hf (``megadoremi-export-hf``)."""

import sys

from megadoremi.tools.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
