"""Thin wrapper: see megadoremi.tools.plan_memory."""
import sys

from megadoremi.tools.plan_memory import main

if __name__ == "__main__":
    sys.exit(main())
