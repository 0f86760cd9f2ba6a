"""``make demo``: DoReMi end to end on the built-in demo corpus, on CPU with 2 ranks.

Generates the demo corpus (6 domains from what every Python installation has) into WORKDIR/corpus, then runs
``megadoremi-pipeline`` on it: tokenizer, preprocessing, reference, DRO proxy, and the baseline and DoReMi main
models, printing the weights table, the per-domain validation losses and the paper's speed-up figure (the main
models are evaluated every steps / 10, ``--eval-interval`` overrides it) (also in WORKDIR/report.md). Every
phase is skipped when complete with the same inputs, so a rerun resumes where an interrupted one stopped. Exit
statuses as ``megadoremi-pipeline``'s (2: a user-input error, one line; ``--debug`` shows its traceback).
"""

import argparse
import os
import sys

from megadoremi import workflow
from megadoremi.data.demo_corpus import make_demo_corpus
from megadoremi.utils.cli import run_cli


def run_demo(argv: list[str]) -> int:
    """Make the demo corpus if WORKDIR has none, then run the workflow on it."""
    parser = argparse.ArgumentParser(prog="megadoremi-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_workdir")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--eval-interval", type=int, default=None,
                        help="steps between validations (default: steps / 10, for the speed-up figure)")
    args, extra = parser.parse_known_args(argv)
    eval_interval = args.eval_interval if args.eval_interval is not None else max(1, args.steps // 10)
    corpus = os.path.join(args.workdir, "corpus")
    if not (os.path.isdir(corpus) and any(name.endswith(".jsonl") for name in os.listdir(corpus))):
        make_demo_corpus(corpus, seed=0)
    return workflow.run_pipeline(["--corpus", corpus, "--workdir", args.workdir, "--steps", str(args.steps),
                                  "--nproc", str(args.nproc), "--rounds", str(args.rounds),
                                  "--eval-interval", str(eval_interval), *extra],
                                 prog="megadoremi-demo")


def main(argv=None) -> int:
    """``megadoremi-demo`` (``make demo``): user-input errors are one line and exit 2."""
    return run_cli("megadoremi-demo", run_demo, argv)


if __name__ == "__main__":
    sys.exit(main())
