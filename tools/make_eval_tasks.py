"""Thin wrapper: see megadoremi.tools.make_eval_tasks."""

import sys

from megadoremi.tools.make_eval_tasks import main

if __name__ == "__main__":
    sys.exit(main())
