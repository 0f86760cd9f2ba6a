"""Merge Megatron indexed datasets into one: ``megadoremi-merge-datasets --input P1 P2 ... --output-prefix OUT``.

The document index is extended correctly (GPT-NeoX's merge forgets to, and megatron-core rejects the result);
the output is written under temporary names and renamed only when complete (those of a killed merge are removed
by the next one). Exit status: 0 merged; 2 on a missing, truncated or foreign input dataset or an unwritable
output (one line naming the file; ``--debug`` adds the traceback).
"""

import argparse
import glob
import os
import sys

from megadoremi.data.indexed_dataset import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter
from megadoremi.utils.cli import run_cli
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)


def expand_prefixes(inputs: list[str]) -> list[str]:
    """Dataset prefixes from prefixes, ``P.bin``/``P.idx`` paths, or folders (every dataset inside, sorted)."""
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(path[:-4] for path in glob.glob(os.path.join(item, "*.idx")))
            if not found:
                raise IndexedDatasetError(f"{item}: folder holds no .idx files")
            prefixes.extend(found)
        elif item.endswith((".bin", ".idx")):
            prefixes.append(item[:-4])
        else:
            prefixes.append(item)
    return prefixes


def merge_datasets(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    """Concatenate datasets in the given order; all inputs are validated before anything is written."""
    if not prefixes:
        raise IndexedDatasetError("no input datasets to merge")
    datasets = [IndexedDataset(prefix) for prefix in prefixes]
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        detail = ", ".join(f"{ds.path_prefix}: {ds.dtype}" for ds in datasets)
        raise IndexedDatasetError(f"inputs have different token dtypes ({detail}); cannot merge")
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise IndexedDatasetError(f"{output_prefix}: output prefix is also an input")
    IndexedDatasetWriter.remove_stale_temporaries(output_prefix)
    with IndexedDatasetWriter(output_prefix, datasets[0].dtype) as writer:
        for ds in datasets:
            writer.add_index(ds.path_prefix)
            logger.info("merged %s (%d documents, %d tokens)", ds.path_prefix, ds.num_documents, ds.num_tokens)
    merged = IndexedDataset(output_prefix)
    logger.info("wrote %s: %d documents, %d tokens", output_prefix, merged.num_documents, merged.num_tokens)
    return merged


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    return run_cli("merge_datasets", _main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="dataset prefixes, .bin/.idx paths or folders")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    merge_datasets(expand_prefixes(args.input), args.output_prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
