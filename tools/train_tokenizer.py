"""Thin wrapper: see megadoremi.tools.train_tokenizer."""
import sys

from megadoremi.tools.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
