"""Thin wrapper: see megadoremi.tools.make_demo_corpus."""
import sys

from megadoremi.tools.make_demo_corpus import main

if __name__ == "__main__":
    sys.exit(main())
