"""``make demo``: DoReMi end to end on the built-in demo corpus, on CPU with 2 ranks.

Generates the demo corpus (6 domains from what every Python installation has) into WORKDIR/corpus, then runs
``megadoremi-pipeline`` on it: tokenizer, preprocessing, reference, DRO proxy, and the baseline and DoReMi main
models, printing the weights table and the per-domain validation losses (also in WORKDIR/report.md). Every
phase is skipped when complete, so a rerun resumes where an interrupted one stopped.
"""

import argparse
import os
import sys

from megadoremi import workflow
from megadoremi.data.demo_corpus import make_demo_corpus


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_workdir")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args, extra = parser.parse_known_args(argv)
    corpus = os.path.join(args.workdir, "corpus")
    if not (os.path.isdir(corpus) and any(name.endswith(".jsonl") for name in os.listdir(corpus))):
        make_demo_corpus(corpus, seed=0)
    return workflow.main(["--corpus", corpus, "--workdir", args.workdir, "--steps", str(args.steps),
                          "--nproc", str(args.nproc), "--rounds", str(args.rounds), *extra])


if __name__ == "__main__":
    sys.exit(main())
