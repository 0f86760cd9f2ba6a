"""Thin wrapper: see megadoremi.tools.make_demo_corpus."""

from megadoremi.tools.make_demo_corpus import main

if __name__ == "__main__":
    main()
