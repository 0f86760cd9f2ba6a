"""Tokenize jsonl corpora into Megatron .bin/.idx datasets, with Megatron's flags.

``megadoremi-preprocess --input data/*.jsonl.gz --json-keys text --output-prefix out/corpus
--tokenizer-model tok.model --append-eod --workers 8`` writes ``out/corpus_text_document.bin/.idx``.
Launched under ``mpiexec -n R`` or ``srun`` it splits the input across the R ranks and merges on rank 0 (see
megadoremi.data.preprocess_mpi). Exit status: 0 on success; 2 on a mistake in the input, one line naming the
file or flag (a bad flag, a missing or empty input file, bad input under --strict, an invalid tokenizer model, a
full disk); 1 when the run failed for another reason (a worker killed, an I/O error: one line; a bug: a
traceback); 130/143 when interrupted by SIGINT/SIGTERM. Nothing is written unless the run succeeds, and
temporary files are removed (those of a run killed with SIGKILL by the next run on the same --output-prefix).
``--debug`` shows the traceback of a user error too.
"""

import argparse
import signal
import sys

from megadoremi.data.preprocess import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_REPORTED, PreprocessConfig, \
    PreprocessError
from megadoremi.data.preprocess_mpi import DistributedRunError, run_preprocess
from megadoremi.utils.cli import EXIT_USAGE, UserError, run_cli
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

TOKENIZER_TYPES = ("SentencePieceTokenizer",)
EXIT_FAILED = 1  # the run failed for a reason outside the input (a killed worker, an I/O error), as a bug does


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so every cleanup path runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def parse_log_interval(value: str) -> tuple[float | None, int | None]:
    """``30s`` -> every 30 seconds; ``1000`` -> every 1000 documents (Megatron's meaning)."""
    try:
        if value.endswith("s"):
            seconds = float(value[:-1])
            if seconds > 0:
                return seconds, None
        else:
            docs = int(value)
            if docs > 0:
                return None, docs
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a positive number of documents (1000) or seconds (30s), "
                                     f"got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """Megatron's preprocessing flags, plus a few of ours (--strict, --chunk-bytes, --distributed, --tmp-dir)."""
    parser = argparse.ArgumentParser(
        description="Tokenize jsonl (or jsonl.gz) documents into Megatron indexed datasets "
                    "{output_prefix}_{key}_document.bin/.idx, one per JSON key.")
    parser.add_argument("--input", nargs="+", required=True,
                        help="jsonl / jsonl.gz files or glob patterns, processed in the given order (each glob's "
                             "matches sorted)")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="keys to extract; one output dataset per key (default: text)")
    parser.add_argument("--output-prefix", required=True, help="outputs are {prefix}_{key}_document.bin/.idx")
    parser.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES,
                        help="accepted for Megatron compatibility; only SentencePiece models are supported "
                             "(--append-eod appends the model's eos id, like Megatron's GPTSentencePieceTokenizer)")
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    parser.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each "
                                                                  "document")
    parser.add_argument("--workers", type=int, default=1,
                        help="tokenizer processes per rank (1: tokenize in the main process)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first bad line or file instead of skipping and counting it")
    parser.add_argument("--allow-empty", action="store_true",
                        help="accept an input file that yields no document (empty, binary, every line bad or "
                             "without the key) instead of failing on it; an output may then hold 0 documents")
    parser.add_argument("--log-interval", type=parse_log_interval, default=(30.0, None),
                        help="progress log line every N documents (1000) or seconds (30s) when stderr is not a "
                             "terminal (default: 30s)")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                        help=f"bytes of input lines per worker task (default: {DEFAULT_CHUNK_BYTES})")
    parser.add_argument("--max-reported", type=int, default=DEFAULT_MAX_REPORTED,
                        help=f"bad lines reported individually (per rank); the rest are counted "
                             f"(default: {DEFAULT_MAX_REPORTED})")
    parser.add_argument("--distributed", choices=("auto", "off", "mpi"), default="auto",
                        help="auto: use MPI (mpi4py) when launched by mpiexec/srun with several tasks; "
                             "off: never; mpi: always")
    parser.add_argument("--tmp-dir", default=None,
                        help="distributed mode: where ranks other than 0 write their parts (node-local is best; "
                             "default: $TMPDIR, else the output directory)")
    return parser


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """The PreprocessConfig the parsed flags describe."""
    log_interval_s, log_interval_docs = args.log_interval
    return PreprocessConfig(
        inputs=list(args.input),
        output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model,
        json_keys=list(args.json_keys),
        append_eod=args.append_eod,
        workers=args.workers,
        strict=args.strict,
        allow_empty=args.allow_empty,
        chunk_bytes=args.chunk_bytes,
        log_interval_s=log_interval_s,
        log_interval_docs=log_interval_docs,
        max_reported=args.max_reported,
        tmp_dir=args.tmp_dir,
        distributed=args.distributed,
    )


def main(argv=None) -> int:
    """Run the command line (``--debug``: tracebacks of user errors too); returns the exit status."""
    return run_cli("preprocess_data", _main, argv)


def _main(argv) -> int:
    """Parse, run, and return the exit status; a UserError is left to ``run_cli``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    config.validate()
    try:
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        previous_sigterm = None
    try:
        run_preprocess(config)
        return 0
    except KeyboardInterrupt as interrupt:
        logger.error("interrupted by %s: no output was written, temporary files removed",
                     "SIGTERM" if isinstance(interrupt, _Terminated) else "SIGINT")
        return 143 if isinstance(interrupt, _Terminated) else 130
    except DistributedRunError as error:
        # Every rank raises it; one reported it already, unless it is this one.
        if not error.quiet:
            if isinstance(error, UserError):
                raise
            logger.error("%s", error)
        return EXIT_USAGE if isinstance(error, UserError) else EXIT_FAILED
    except UserError:
        raise
    except PreprocessError as error:  # not the input's fault (a worker was killed): one line, no traceback
        logger.error("%s", error)
        return EXIT_FAILED
    except OSError as error:  # an I/O error reading or writing: nothing was written
        logger.error("%s", error)
        return EXIT_FAILED
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
