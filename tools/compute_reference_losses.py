"""Thin wrapper: see megadoremi.tools.compute_reference_losses."""
import sys

from megadoremi.tools.compute_reference_losses import main

if __name__ == "__main__":
    sys.exit(main())
