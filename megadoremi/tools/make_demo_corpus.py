"""Write the deterministic multi-domain demo corpus (one <domain>.jsonl per domain), built locally, no downloads.

    python tools/make_demo_corpus.py demo_workdir/raw --seed 0

Exit status: 0; 2 on a bad setting or an unwritable OUTDIR (one line; ``--debug`` adds the traceback).
"""

import argparse
import sys

from megadoremi.data.demo_corpus import DEFAULT_TARGET_BYTES_PER_DOMAIN, DOMAINS, make_demo_corpus
from megadoremi.utils.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", metavar="OUTDIR", help="folder for the <domain>.jsonl files (created if needed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bytes-per-domain", type=int, default=DEFAULT_TARGET_BYTES_PER_DOMAIN,
                        help="text bytes per domain (default: %(default)s)")
    parser.add_argument("--docs-per-domain", type=int, default=None,
                        help="exactly this many documents per domain instead of a byte target")
    parser.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    return run_cli("make_demo_corpus", _main, argv)


def _main(argv) -> int:
    """Parse arguments and write the corpus."""
    args = build_parser().parse_args(argv)
    make_demo_corpus(
        args.outdir,
        seed=args.seed,
        target_bytes_per_domain=args.bytes_per_domain,
        docs_per_domain=args.docs_per_domain,
        domains=args.domains,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
