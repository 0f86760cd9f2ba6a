"""Inspect a Megatron indexed dataset: counts, length statistics, token histogram, decoded samples.

``megadoremi-inspect-dataset PREFIX [--tokenizer-model M] [--sample I ...] [--top-tokens K] [--json]``

Exit status: 0; 2 on a missing, truncated or foreign dataset, an invalid tokenizer model or a --sample out of
range (one line naming the file or flag; ``--debug`` adds the traceback).
"""

import argparse
import json
import sys

import numpy as np

from megadoremi.data.indexed_dataset import IndexedDataset
from megadoremi.utils.cli import UserError, run_cli

# Tokens read for the histogram when the dataset is larger (a strided sample of sequences).
_HISTOGRAM_TOKEN_BUDGET = 50_000_000


def token_histogram(ds: IndexedDataset, top_k: int) -> tuple[list[tuple[int, int]], int]:
    """The ``top_k`` most frequent token ids as (id, count), and how many tokens were counted."""
    if len(ds) == 0:
        return [], 0
    stride = max(1, int(np.ceil(ds.num_tokens / _HISTOGRAM_TOKEN_BUDGET)))
    counts = np.zeros(0, np.int64)
    counted = 0
    for i in range(0, len(ds), stride):
        tokens = ds[i].astype(np.int64)
        if tokens.size:
            binned = np.bincount(tokens)
            if binned.size > counts.size:
                binned[: counts.size] += counts
                counts = binned
            else:
                counts[: binned.size] += binned
            counted += tokens.size
    order = np.argsort(-counts, kind="stable")[:top_k]
    return [(int(t), int(counts[t])) for t in order if counts[t] > 0], counted


def inspect(prefix: str, tokenizer_model: str | None, samples: list[int], top_k: int) -> dict:
    """A JSON-serialisable report of the dataset."""
    ds = IndexedDataset(prefix, verify=True)
    lengths = ds.sequence_lengths
    report = {
        "prefix": prefix,
        "dtype": str(ds.dtype),
        "num_sequences": len(ds),
        "num_documents": ds.num_documents,
        "num_tokens": ds.num_tokens,
        "sequence_length": {},
    }
    if len(ds):
        report["sequence_length"] = {
            "min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max()),
            **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)},
        }
    tokenizer = None
    if tokenizer_model:
        from megadoremi.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(tokenizer_model)
    top, counted = token_histogram(ds, top_k)
    report["token_histogram"] = {
        "tokens_counted": counted,
        "top": [
            {"id": t, "count": c, **({"piece": tokenizer.decode([t])} if tokenizer else {})} for t, c in top
        ],
    }
    report["samples"] = {}
    for i in samples:
        if not -len(ds) <= i < len(ds):
            raise UserError(f"--sample {i}: out of range, {prefix} holds {len(ds)} sequences")
        tokens = ds[i]
        entry = {"length": int(tokens.size), "tokens": tokens.tolist()}
        if tokenizer:
            entry["text"] = tokenizer.decode(tokens.tolist())
        report["samples"][str(i)] = entry
    return report


def print_report(report: dict) -> None:
    print(f"dataset   {report['prefix']}  ({report['dtype']})")
    print(f"documents {report['num_documents']:,}  sequences {report['num_sequences']:,}  "
          f"tokens {report['num_tokens']:,}")
    if report["sequence_length"]:
        stats = report["sequence_length"]
        print("length    " + "  ".join(f"{k} {v:,.1f}" for k, v in stats.items()))
    hist = report["token_histogram"]
    print(f"top tokens (of {hist['tokens_counted']:,} counted):")
    for entry in hist["top"]:
        piece = f"  {entry['piece']!r}" if "piece" in entry else ""
        print(f"  {entry['id']:>8} {entry['count']:>12,}{piece}")
    for i, entry in report["samples"].items():
        print(f"--- sequence {i} ({entry['length']} tokens)")
        print(entry.get("text", entry["tokens"]))


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    return run_cli("inspect_dataset", _main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(description="Inspect a Megatron indexed dataset (.bin/.idx)")
    parser.add_argument("prefix", help="dataset path prefix (without .bin/.idx)")
    parser.add_argument("--tokenizer-model", help="SentencePiece model to decode samples and histogram pieces")
    parser.add_argument("--sample", type=int, nargs="*", default=[], help="sequence indices to print")
    parser.add_argument("--top-tokens", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    prefix = args.prefix[:-4] if args.prefix.endswith((".bin", ".idx")) else args.prefix
    report = inspect(prefix, args.tokenizer_model, args.sample, args.top_tokens)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
