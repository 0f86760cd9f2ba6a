"""Data-layer benchmarks, each against its named anchor measured in the same run.

(a) Preprocessing throughput per worker as a ratio to bare ``SentencePieceProcessor.encode`` over the same
    documents (the limit), and the speed-up from 1 to 2 workers.
(b) ``build_blending_indices`` for N samples x 22 domains as a ratio to megatron-core's compiled C++ helper
    (skipped when megatron-core is not installed; it is a test-only dependency).
(c) Random-access reads per second: GPT samples of seq_length + 1 tokens at random indices, and raw documents.

    python tools/bench_data.py [--corpus-mb 24] [--blend-samples 100000000] [--json]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

from megadoremi.data.blending_indices import build_blending_indices
from megadoremi.data.demo_corpus import make_demo_corpus
from megadoremi.data.gpt_dataset import GPTSampleDataset
from megadoremi.data.indexed_dataset import IndexedDataset
from megadoremi.data.preprocess import PreprocessConfig
from megadoremi.data.preprocess_mpi import run_preprocess
from megadoremi.data.tokenizer import train_tokenizer

# 22 domain weights shaped like The Pile's (tiny entries included), normalised at use.
PILE_LIKE_WEIGHTS = [0.1121, 0.1247, 0.0919, 0.0042, 0.0027, 0.1071, 0.1052, 0.0198, 0.0762, 0.0604, 0.0518,
                     0.0473, 0.0321, 0.0235, 0.0169, 0.0127, 0.0093, 0.0066, 0.0049, 0.0012, 0.0006, 0.0001]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_corpus(root: str, target_mb: float) -> tuple[str, str, list[str]]:
    """A jsonl corpus of about ``target_mb`` MB (the demo domains repeated) and a 32k-vocabulary tokenizer."""
    files = make_demo_corpus(os.path.join(root, "demo"), seed=0)
    train_tokenizer(list(files.values()), os.path.join(root, "tok"), 32000, max_chars=4_000_000, seed=0)
    lines = []
    for path in files.values():
        with open(path) as handle:
            lines.extend(handle)
    corpus = os.path.join(root, "corpus.jsonl")
    written = 0
    with open(corpus, "w") as handle:
        while written < target_mb * 1e6:
            for line in lines:
                handle.write(line)
                written += len(line)
    texts = []
    with open(corpus) as handle:
        texts = [json.loads(line)["text"] for line in handle]
    return corpus, os.path.join(root, "tok.model"), texts


def bench_preprocessing(root: str, target_mb: float, repeats: int) -> dict:
    corpus, model, texts = build_corpus(root, target_mb)
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=model)
    megabytes = os.path.getsize(corpus) / 1e6

    def bare():
        processor.encode(texts, num_threads=1)

    def preprocess(workers):
        config = PreprocessConfig(inputs=[corpus], output_prefix=os.path.join(root, f"out{workers}"),
                                  tokenizer_model=model, append_eod=True, workers=workers, log_interval_s=None,
                                  progress_bar=False, distributed="off")
        run_preprocess(config)

    # Alternate the three measurements so background load hits them alike.
    timings = {"bare": [], 1: [], 2: []}
    for _ in range(repeats):
        timings["bare"].append(median_time(bare, 1))
        timings[1].append(median_time(lambda: preprocess(1), 1))
        timings[2].append(median_time(lambda: preprocess(2), 1))
    bare_s, one_s, two_s = (statistics.median(timings[k]) for k in ("bare", 1, 2))
    return {
        "corpus_mb": round(megabytes, 2), "documents": len(texts), "vocab_size": processor.vocab_size(),
        "bare_encode_s": bare_s, "bare_encode_mb_per_s": megabytes / bare_s,
        "workers1_s": one_s, "workers1_mb_per_s": megabytes / one_s,
        "workers2_s": two_s, "workers2_mb_per_s": megabytes / two_s,
        "per_worker_ratio_to_bare_encode": bare_s / one_s,
        "speedup_1_to_2_workers": one_s / two_s,
    }


def bench_blending(num_samples: int, repeats: int) -> dict:
    weights = np.asarray(PILE_LIKE_WEIGHTS, dtype=np.float64)
    weights /= weights.sum()
    result = {"samples": num_samples, "domains": len(weights)}
    ours = []
    for _ in range(repeats):
        start = time.perf_counter()
        ours_index, ours_sample = build_blending_indices(weights, num_samples)
        ours.append(time.perf_counter() - start)
    result["ours_s"] = statistics.median(ours)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers_cpp
    except Exception as error:  # megatron-core is a test-only dependency
        result["megatron_helper"] = f"unavailable: {error}"
        return result
    theirs = []
    for _ in range(repeats):
        dataset_index = np.zeros(num_samples, dtype=np.int16)
        dataset_sample_index = np.zeros(num_samples, dtype=np.int64)
        start = time.perf_counter()
        helpers_cpp.build_blending_indices(dataset_index, dataset_sample_index, weights, len(weights),
                                           num_samples, False)
        theirs.append(time.perf_counter() - start)
    result["megatron_cpp_s"] = statistics.median(theirs)
    result["ratio_ours_over_megatron"] = result["ours_s"] / result["megatron_cpp_s"]
    result["identical"] = bool(np.array_equal(ours_index, dataset_index)
                               and np.array_equal(ours_sample, dataset_sample_index))
    return result


def bench_random_reads(root: str, seq_length: int, num_reads: int) -> dict:
    prefix = os.path.join(root, "out1_text_document")
    indexed = IndexedDataset(prefix)
    dataset = GPTSampleDataset(indexed, seq_length=seq_length, num_samples=None, seed=0,
                               cache_dir=os.path.join(root, "cache"), name="bench")
    rng = np.random.default_rng(0)
    sample_ids = rng.integers(0, len(dataset), num_reads)
    start = time.perf_counter()
    for i in sample_ids:
        dataset[int(i)]
    samples_s = time.perf_counter() - start
    doc_ids = rng.integers(0, len(indexed), num_reads)
    start = time.perf_counter()
    for i in doc_ids:
        indexed[int(i)]
    docs_s = time.perf_counter() - start
    return {"seq_length": seq_length, "dataset_tokens": indexed.num_tokens,
            "gpt_samples_per_s": num_reads / samples_s, "documents_per_s": num_reads / docs_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=24.0)
    parser.add_argument("--blend-samples", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--reads", type=int, default=20000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["preprocess", "blend", "reads"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = {"date": datetime.date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, "
              f"{os.cpu_count()} cores", "python": platform.python_version(), "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as root:
        if "preprocess" not in args.skip or "reads" not in args.skip:
            report["preprocessing"] = bench_preprocessing(root, args.corpus_mb, args.repeats)
        if "reads" not in args.skip:
            report["random_reads"] = bench_random_reads(root, args.seq_length, args.reads)
    if "blend" not in args.skip:
        report["blending"] = bench_blending(args.blend_samples, max(1, args.repeats // 2))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for section, values in report.items():
            if isinstance(values, dict):
                print(f"[{section}]")
                for key, value in values.items():
                    print(f"  {key:34s} {value:.4g}" if isinstance(value, float) else f"  {key:34s} {value}")
            else:
                print(f"{section}: {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
