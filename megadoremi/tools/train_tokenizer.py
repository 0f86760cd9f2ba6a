"""Train a SentencePiece tokenizer on an even per-domain sample of jsonl files.

    python tools/train_tokenizer.py --input data/raw/ --model-prefix tok/spm32k --vocab-size 32000

Exit status: 0; 2 on a missing or unusable input, a bad setting or an unwritable output (one line naming the file
or flag; ``--debug`` adds the traceback).
"""

import argparse
import sys

from megadoremi.data.tokenizer import DEFAULT_MAX_CHARS, DEFAULT_NUM_THREADS, train_tokenizer
from megadoremi.utils.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="jsonl / jsonl.gz files, glob patterns, or folders of <domain>.jsonl[.gz]; "
                             "each file is one domain")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                        help="characters sampled in all, split evenly across domains (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9999)
    parser.add_argument("--num-threads", type=int, default=DEFAULT_NUM_THREADS,
                        help="trainer threads; part of the determinism contract (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    return run_cli("train_tokenizer", _main, argv)


def _main(argv) -> int:
    """Parse arguments and train."""
    args = build_parser().parse_args(argv)
    train_tokenizer(
        args.input,
        args.model_prefix,
        args.vocab_size,
        max_chars=args.max_chars,
        seed=args.seed,
        json_key=args.json_key,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        num_threads=args.num_threads,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
