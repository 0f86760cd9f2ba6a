"""tools/preprocess_data.py: Megatron-compatible output, byte-identical for any number of workers and MPI ranks,
bad input skipped and reported (or fatal under --strict), nothing left behind on failure or Ctrl-C."""

import errno
import gzip
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm

from megadoremi.data import indexed_dataset, preprocess_mpi
from megadoremi.data.indexed_dataset import IndexedDataset
from megadoremi.data.output_files import OutputWriteError, this_host
from megadoremi.data.preprocess import InputFile, InputRange, iter_jobs
from megadoremi.data.preprocess_mpi import PartWriter, count_line_starts, mpi_launch_hint, split_ranges
from megadoremi.data.tokenizer import Tokenizer
from megadoremi.tools.preprocess_data import main as preprocess_main
from megadoremi.utils.cli import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO_ROOT, "tools", "preprocess_data.py")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")

_WORDS = ("the", "data", "mixture", "weights", "domain", "token", "résumé", "naïve", "日本語", "données", "über",
          "emoji😀", "tab\there", "quote\"s", "back\\slash", "x = 42", "def f():", "new\nline", "Ωμέγα", "ﬁ")


def make_texts(num_docs: int, seed: int, max_words: int = 400) -> list[str]:
    """Deterministic documents of varied length and script; every 50th is empty (zero tokens)."""
    rng = random.Random(seed)
    texts = []
    for index in range(num_docs):
        if index % 50 == 7:
            texts.append("")
            continue
        texts.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, max_words))))
    return texts


def jsonl_bytes(texts: list[str], key: str = "text") -> bytes:
    # Mix escaped and raw UTF-8 lines: both must tokenize the same.
    return b"".join(json.dumps({key: text, "id": i}, ensure_ascii=i % 2 == 0).encode() + b"\n"
                    for i, text in enumerate(texts))


def write(path, data: bytes) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(data)
    return path


def run_tool(*args, timeout: int = 60, mpi_ranks: int = 0) -> subprocess.CompletedProcess:
    command = [sys.executable, TOOL, *map(str, args)]
    if mpi_ranks:
        command = [MPIEXEC, "-n", str(mpi_ranks), *command]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def output_bytes(prefix: str, key: str = "text") -> tuple[bytes, bytes]:
    with open(f"{prefix}_{key}_document.bin", "rb") as data, open(f"{prefix}_{key}_document.idx", "rb") as index:
        return data.read(), index.read()


def expected_documents(tokenizer: Tokenizer, texts: list[str], append_eod: bool) -> list[list[int]]:
    docs = []
    for text in texts:
        ids = tokenizer.encode(text)
        if ids:  # zero-token documents are skipped
            docs.append(ids + [tokenizer.eod] if append_eod else ids)
    return docs


def assert_dataset_equals(prefix: str, docs: list[list[int]]) -> None:
    ds = IndexedDataset(prefix, verify=True)
    assert len(ds) == ds.num_documents == len(docs)
    assert ds.dtype == np.uint16
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == doc, f"document {i}"


def assert_nothing_left(directory: str) -> None:
    """No output pair, no temporary file, no part directory."""
    left = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    assert left == [], left


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> str:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_texts(400, seed=1)), model_writer=model, vocab_size=450, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("tokenizer") / "tiny.model"
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_model) -> Tokenizer:
    return Tokenizer(tokenizer_model)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Three plain files (one large, split mid-line across ranks) and a .gz file, with their texts."""
    root = tmp_path_factory.mktemp("corpus")
    texts = {name: make_texts(num, seed) for name, num, seed in
             (("a.jsonl", 300, 2), ("b.jsonl", 40, 3), ("c.jsonl.gz", 120, 4), ("d.jsonl", 60, 5))}
    paths = {name: write(root / name, jsonl_bytes(docs)) for name, docs in texts.items()}
    return paths, texts


# ------------------------------------------------------------------------------------------ output correctness


def test_output_matches_direct_tokenization_and_megatron_reads_it(tmp_path, corpus, tokenizer, tokenizer_model):
    paths, texts = corpus
    names = ["a.jsonl", "b.jsonl", "c.jsonl.gz"]
    prefix = str(tmp_path / "out" / "corpus")
    result = run_tool("--input", *(paths[n] for n in names), "--output-prefix", prefix, "--tokenizer-model",
                      tokenizer_model, "--tokenizer-type", "SentencePieceTokenizer", "--append-eod")
    assert result.returncode == 0, result.stderr
    all_texts = [t for n in names for t in texts[n]]
    docs = expected_documents(tokenizer, all_texts, append_eod=True)
    assert_dataset_equals(prefix + "_text_document", docs)
    num_empty = sum(1 for t in all_texts if not tokenizer.encode(t))
    assert num_empty > 0
    assert f"empty_document {num_empty}" in result.stderr
    assert re.search(rf"done: {len(docs):,} docs, [\d,]+ tokens .* docs/s, [\d.]+ MB/s", result.stderr)
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus_text_document.bin", "corpus_text_document.idx"]

    # megatron-core (test-only oracle) reads the same documents.
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    megatron = MegatronIndexedDataset(prefix + "_text_document")
    assert len(megatron) == len(docs)
    assert megatron.document_indices.tolist() == list(range(len(docs) + 1))
    for i in (0, 1, len(docs) // 2, len(docs) - 1):
        assert megatron[i].tolist() == docs[i]

    # Without --append-eod: no eod token.
    result = run_tool("--input", paths["b.jsonl"], "--output-prefix", tmp_path / "noeod", "--tokenizer-model",
                      tokenizer_model)
    assert result.returncode == 0, result.stderr
    assert_dataset_equals(str(tmp_path / "noeod_text_document"),
                          expected_documents(tokenizer, texts["b.jsonl"], append_eod=False))


def test_output_is_byte_identical_for_any_number_of_workers(tmp_path, corpus, tokenizer_model):
    paths, _ = corpus
    outputs = []
    for workers in (1, 2, 3):
        prefix = tmp_path / f"w{workers}"
        # Small chunks: many tasks in flight, results arriving out of order.
        result = run_tool("--input", paths["a.jsonl"], paths["c.jsonl.gz"], "--output-prefix", prefix,
                          "--tokenizer-model", tokenizer_model, "--append-eod", "--workers", workers,
                          "--chunk-bytes", 20000)
        assert result.returncode == 0, result.stderr
        outputs.append(output_bytes(str(prefix)))
    assert outputs[0] == outputs[1] == outputs[2]


def test_gz_input_equals_plain(tmp_path, tokenizer_model):
    data = jsonl_bytes(make_texts(80, seed=9))
    plain, packed = write(tmp_path / "in" / "x.jsonl", data), write(tmp_path / "in" / "x.jsonl.gz", data)
    for name, path in (("plain", plain), ("gz", packed)):
        result = run_tool("--input", path, "--output-prefix", tmp_path / name, "--tokenizer-model", tokenizer_model,
                          "--append-eod", "--chunk-bytes", 5000)
        assert result.returncode == 0, result.stderr
    assert output_bytes(str(tmp_path / "plain")) == output_bytes(str(tmp_path / "gz"))


def test_multiple_json_keys_write_one_dataset_each(tmp_path, tokenizer, tokenizer_model):
    texts, titles = make_texts(30, seed=6), make_texts(30, seed=7, max_words=5)
    records = [{"title": title, "text": text} for title, text in zip(titles, texts)]
    del records[4]["title"]  # line 5: only the title dataset skips it
    path = write(tmp_path / "in.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in records))
    prefix = str(tmp_path / "out" / "multi")
    result = run_tool("--input", path, "--json-keys", "text", "title", "--output-prefix", prefix,
                      "--tokenizer-model", tokenizer_model, "--append-eod")
    assert result.returncode == 0, result.stderr
    assert f"{path}:5: missing key 'title'" in result.stderr
    assert_dataset_equals(prefix + "_text_document", expected_documents(tokenizer, texts, True))
    assert_dataset_equals(prefix + "_title_document",
                          expected_documents(tokenizer, titles[:4] + titles[5:], True))


def test_glob_input_is_sorted_and_equals_explicit_list(tmp_path, tokenizer, tokenizer_model):
    texts = {name: make_texts(10, seed) for seed, name in enumerate(["c.jsonl", "a.jsonl", "b.jsonl.gz"])}
    for name, docs in texts.items():  # created in non-sorted order
        write(tmp_path / "in" / name, jsonl_bytes(docs))
    result = run_tool("--input", str(tmp_path / "in" / "*.jsonl*"), "--output-prefix", tmp_path / "glob",
                      "--tokenizer-model", tokenizer_model, "--append-eod")
    assert result.returncode == 0, result.stderr
    ordered = texts["a.jsonl"] + texts["b.jsonl.gz"] + texts["c.jsonl"]
    assert_dataset_equals(str(tmp_path / "glob_text_document"), expected_documents(tokenizer, ordered, True))

    result = run_tool("--input", str(tmp_path / "in" / "*.nothing"), "--output-prefix", tmp_path / "none",
                      "--tokenizer-model", tokenizer_model)
    assert result.returncode == 2 and "no input file matches" in result.stderr


# ------------------------------------------------------------------------------------------------- bad input

_GOOD = [json.dumps({"text": t}).encode() for t in ("first good document", "second good document", "third")]

# name -> (bad file name, its bytes, line reported, reason counted)
BAD_INPUTS = {
    "malformed_json": ("bad.jsonl", b"\n".join([_GOOD[0], b'{"text": "unterminated', _GOOD[1]]) + b"\n", 2,
                       "malformed_json"),
    "missing_key": ("bad.jsonl", b"\n".join([_GOOD[0], _GOOD[1], b'{"body": "no text"}']), 3, "missing_key"),
    "non_string": ("bad.jsonl", b"\n".join([_GOOD[0], b"", b'{"text": 17}', _GOOD[1]]) + b"\n", 3, "non_string"),
    "invalid_utf8": ("bad.jsonl", b"\n".join([b'{"text": "caf\xe9"}', _GOOD[0]]) + b"\n", 1, "invalid_utf8"),
    "not_an_object": ("bad.jsonl", b"\n".join([_GOOD[0], b'["text", "x"]']) + b"\n", 2, "not_an_object"),
    "lone_surrogate": ("bad.jsonl", b"\n".join([_GOOD[0], b'{"text": "a\\ud800b"}']) + b"\n", 2, "invalid_unicode"),
    "empty_file": ("empty.jsonl", b"", 1, "empty_file"),
    "blank_lines_only": ("blank.jsonl", b"\n  \n\t\n", 1, "empty_file"),
    "corrupt_gzip": ("bad.jsonl.gz", gzip.compress(b"\n".join(_GOOD) + b"\n")[:-12], None, "corrupt_gzip"),
}
# Cases whose bad file yields no document at all: an error naming the file unless --allow-empty.
YIELD_NOTHING = {"empty_file", "blank_lines_only", "corrupt_gzip"}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_skipped_and_reported_or_fatal_under_strict(tmp_path, case, tokenizer, tokenizer_model):
    name, data, line, reason = BAD_INPUTS[case]
    good = write(tmp_path / "in" / "good.jsonl", b"\n".join(_GOOD) + b"\n")
    bad = os.path.join(tmp_path, "in", name)
    with open(bad, "wb") as handle:
        handle.write(data)
    location = re.escape(f"{bad}:{line}:") if line else re.escape(bad) + r":\d+:"

    allow = []
    if case in YIELD_NOTHING:
        result = run_tool("--input", good, bad, "--output-prefix", tmp_path / "none" / "x", "--tokenizer-model",
                          tokenizer_model)
        assert result.returncode == 2, result.stderr
        assert re.search(rf"preprocess_data: error: {re.escape(bad)}: no documents \(.*\); pass --allow-empty",
                         result.stderr), result.stderr
        assert "Traceback" not in result.stderr
        assert_nothing_left(str(tmp_path / "none"))
        allow = ["--allow-empty"]
    result = run_tool("--input", good, bad, "--output-prefix", tmp_path / "out" / "x", "--tokenizer-model",
                      tokenizer_model, *allow)
    assert result.returncode == 0, result.stderr
    assert re.search(location, result.stderr), result.stderr
    assert re.search(rf"skipped: .*{reason} 1", result.stderr), result.stderr
    ds = IndexedDataset(str(tmp_path / "out" / "x_text_document"))
    assert ds.num_documents >= len(_GOOD)  # the good file's documents, plus the bad file's good lines

    strict_out = tmp_path / "strict"
    result = run_tool("--input", good, bad, "--output-prefix", strict_out / "x", "--tokenizer-model",
                      tokenizer_model, "--strict", "--workers", 2)
    assert result.returncode == 2, result.stderr  # bad input is the user's to fix: one line, no traceback
    assert re.search(location, result.stderr), result.stderr
    assert_nothing_left(str(strict_out))


def test_missing_input_file_is_an_error_before_any_work(tmp_path, tokenizer_model):
    good = write(tmp_path / "good.jsonl", b"\n".join(_GOOD))
    missing = str(tmp_path / "missing.jsonl")
    for extra in ([], ["--strict"]):
        result = run_tool("--input", good, missing, "--output-prefix", tmp_path / "out" / "x", "--tokenizer-model",
                          tokenizer_model, *extra)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"preprocess_data: error: {missing}: input file not found"]
        assert_nothing_left(str(tmp_path / "out"))


def test_unsupported_tokenizer_type_is_a_usage_error(tmp_path, tokenizer_model):
    result = run_tool("--input", "x.jsonl", "--output-prefix", tmp_path / "x", "--tokenizer-model", tokenizer_model,
                      "--tokenizer-type", "GPT2BPETokenizer")
    assert result.returncode == 2 and "invalid choice" in result.stderr


# ------------------------------------------------------------------------------------------------ distributed


def test_split_ranges_and_line_numbers(tmp_path):
    """Every line is read exactly once whatever the cut points, and line counts give global numbers."""
    rng = random.Random(0)
    lines = [("x" * rng.randint(0, 30)).encode() for _ in range(200)]
    data = b"\n".join(lines)  # no trailing newline: the last line still counts
    path = write(tmp_path / "f.jsonl", data)
    files = [InputFile(path, len(data), False)]
    for num_parts in (1, 2, 3, 7, 500):
        parts = split_ranges(files, num_parts)
        seen, next_line = [], 1
        for part in parts:
            for rng_ in part:
                first = next_line
                for job in iter_jobs(files, [rng_], [first], chunk_bytes=64):
                    if hasattr(job, "blob"):
                        assert job.first_line == next_line
                        chunk_lines = job.blob.split(b"\n")
                        if job.blob.endswith(b"\n"):
                            chunk_lines.pop()
                        seen.extend(chunk_lines)
                        next_line += len(chunk_lines)
                assert next_line - first == count_line_starts(path, rng_.start, rng_.end)
        assert seen == lines, num_parts
    # A .gz file is never cut; empty files go to exactly one part.
    files = [InputFile("a", 100, False), InputFile("b.gz", 100, True), InputFile("e", 0, False),
             InputFile("c", 100, False)]
    parts = split_ranges(files, 4)
    assert parts == [[InputRange(0, 0, 75)], [InputRange(0, 75, 100), InputRange(1, 0, 100)],
                     [InputRange(2, 0, 0), InputRange(3, 0, 25)], [InputRange(3, 25, 100)]]


def test_mpi_launch_detection():
    assert mpi_launch_hint({}) is None
    assert mpi_launch_hint({"PMI_SIZE": "1", "PMI_RANK": "0"}) is None
    assert mpi_launch_hint({"PMI_SIZE": "4", "PMI_RANK": "2"}) == "PMI_SIZE=4"
    assert mpi_launch_hint({"OMPI_COMM_WORLD_SIZE": "2"}) == "OMPI_COMM_WORLD_SIZE=2"
    assert mpi_launch_hint({"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3"}) == "SLURM_STEP_NUM_TASKS=8"
    # An sbatch script (no srun step) with --ntasks 8 is not a distributed launch.
    assert mpi_launch_hint({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) is None


def test_srun_tasks_without_a_working_mpi_world_are_refused(tmp_path, tokenizer_model):
    """srun -n 2 without --mpi=pmi2: each task is an MPI world of 1 and would write the same outputs."""
    good = write(tmp_path / "good.jsonl", b"\n".join(_GOOD))
    env = {**os.environ, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    command = [sys.executable, TOOL, "--input", good, "--output-prefix", str(tmp_path / "out" / "x"),
               "--tokenizer-model", tokenizer_model]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode != 0
    assert "launched as one of several tasks (SLURM_STEP_NUM_TASKS=2) but MPI sees a world of 1" in result.stderr
    assert_nothing_left(str(tmp_path / "out"))
    # mpiexec -n 1 inside such a step: the MPI launcher's own size (1) wins, and the single process runs.
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env={**env, "PMI_SIZE": "1", "PMI_RANK": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.exists(str(tmp_path / "out" / "x_text_document.idx"))


def _mid_line_single_file(tmp_path) -> tuple[str, int]:
    """One file whose 2-rank split point falls inside a line, with a malformed line in rank 1's half."""
    texts = make_texts(200, seed=11)
    lines = jsonl_bytes(texts).split(b"\n")[:-1]
    bad_line = 170
    lines[bad_line - 1] = b'{"text": broken}'
    while True:
        data = b"\n".join(lines) + b"\n"
        middle = len(data) // 2
        if data[middle - 1:middle] != b"\n" and data[middle:middle + 1] != b"\n":
            break
        lines[0] += b" "  # JSON allows trailing whitespace: shift the split point
    assert data[:middle].count(b"\n") < bad_line - 1
    return write(tmp_path / "in" / "one.jsonl", data), bad_line


def test_mpi_two_ranks_split_one_file_mid_line(tmp_path, tokenizer_model):
    path, bad_line = _mid_line_single_file(tmp_path)
    parts = split_ranges([InputFile(path, os.path.getsize(path), False)], 2)
    assert parts[1][0].start == parts[0][0].end  # the file is cut between the ranks...
    with open(path, "rb") as handle:
        handle.seek(parts[1][0].start - 1)
        assert handle.read(1) != b"\n"  # ...inside a line

    common = ["--input", path, "--tokenizer-model", tokenizer_model, "--append-eod", "--chunk-bytes", 20000]
    single = run_tool(*common, "--output-prefix", tmp_path / "single", "--distributed", "off")
    assert single.returncode == 0, single.stderr
    tmp_dir = tmp_path / "parts"
    result = run_tool(*common, "--output-prefix", tmp_path / "out" / "mpi", "--workers", 2, "--tmp-dir", tmp_dir,
                      mpi_ranks=2, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "rank 0/2" in result.stderr
    assert output_bytes(str(tmp_path / "single")) == output_bytes(str(tmp_path / "out" / "mpi"))
    # The bad line was read by rank 1, which still reports its global line number.
    assert f"[megadoremi rank1] WARNING skipped {path}:{bad_line}: malformed JSON" in result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["mpi_text_document.bin", "mpi_text_document.idx"]
    assert_nothing_left(str(tmp_dir))

    # --strict: every rank exits non-zero, the message names file:line, nothing is left behind.
    result = run_tool(*common, "--output-prefix", tmp_path / "strict" / "mpi", "--strict", "--tmp-dir", tmp_dir,
                      mpi_ranks=2, timeout=120)
    assert result.returncode != 0
    assert f"{path}:{bad_line}: malformed JSON" in result.stderr
    assert "preprocessing failed on rank 1" in result.stderr
    assert_nothing_left(str(tmp_path / "strict"))
    assert_nothing_left(str(tmp_dir))


def test_mpi_two_ranks_several_files_with_gz(tmp_path, corpus, tokenizer_model):
    paths, _ = corpus
    inputs = [paths["b.jsonl"], paths["c.jsonl.gz"], paths["a.jsonl"], paths["d.jsonl"]]
    common = ["--input", *inputs, "--tokenizer-model", tokenizer_model, "--append-eod"]
    single = run_tool(*common, "--output-prefix", tmp_path / "single")
    assert single.returncode == 0, single.stderr
    result = run_tool(*common, "--output-prefix", tmp_path / "mpi", mpi_ranks=2, timeout=120)
    assert result.returncode == 0, result.stderr
    assert output_bytes(str(tmp_path / "single")) == output_bytes(str(tmp_path / "mpi"))


# ------------------------------------------------------------------------------------ interruption and memory


@pytest.fixture(scope="session")
def large_input(tmp_path_factory) -> str:
    """About 24 MB of jsonl: several seconds of tokenizing here."""
    block = jsonl_bytes(make_texts(2000, seed=12))
    repeats = max(1, (24 << 20) // len(block))
    return write(tmp_path_factory.mktemp("large") / "large.jsonl", block * repeats)


@pytest.mark.parametrize("sig,workers,ranks,code", [(signal.SIGINT, 2, 0, 130), (signal.SIGTERM, 1, 0, 143),
                                                     (signal.SIGINT, 1, 2, 130)])
def test_interrupt_leaves_nothing_behind(tmp_path, large_input, tokenizer_model, sig, workers, ranks, code):
    out, parts = tmp_path / "out", tmp_path / "parts"
    command = [sys.executable, TOOL, "--input", large_input, "--output-prefix", out / "x", "--tokenizer-model",
               tokenizer_model, "--workers", str(workers), "--chunk-bytes", "100000", "--tmp-dir", parts]
    if ranks:  # mpiexec forwards the signal to every rank
        command = [MPIEXEC, "-n", str(ranks), *command]
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an inherited
    # SIG_IGN (as it should): under `make test &` the tool would never see the Ctrl-C. Start it as a terminal would.
    process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        # Wait until tokens are being written (the temporary .bin has grown), i.e. mid-run.
        while time.monotonic() < deadline and process.poll() is None:
            temps = [n for n in os.listdir(out) if ".tmp-" in n] if out.is_dir() else []
            if any(os.path.getsize(out / n) > 0 for n in temps if os.path.exists(out / n)):
                break
            time.sleep(0.02)
        assert process.poll() is None, "the run finished before it could be interrupted"
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, stderr
    assert "interrupted" in stderr
    assert_nothing_left(str(out))
    assert_nothing_left(str(parts))


def _peak_rss_kib(args) -> int:
    script = ("import resource, sys\n"
              "from megadoremi.tools.preprocess_data import main\n"
              "code = main(sys.argv[1:])\n"
              "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
              "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(re.search(r"PEAK_RSS_KIB (\d+)", result.stdout).group(1))


def test_memory_does_not_grow_with_corpus_size(tmp_path, large_input, tokenizer_model):
    """Peak RSS for a corpus 10x larger grows by far less than the extra input (streaming, bounded window)."""
    with open(large_input, "rb") as handle:
        data = handle.read()
    small = write(tmp_path / "small.jsonl", data[:data.index(b"\n", len(data) // 10) + 1])
    common = ["--tokenizer-model", tokenizer_model, "--append-eod", "--workers", 1]
    small_kib = _peak_rss_kib(["--input", small, "--output-prefix", tmp_path / "small", *common])
    large_kib = _peak_rss_kib(["--input", large_input, "--output-prefix", tmp_path / "large", *common])
    extra_input_kib = (len(data) - os.path.getsize(small)) // 1024
    assert large_kib - small_kib < extra_input_kib // 4, (small_kib, large_kib, extra_input_kib)


# ----------------------------------------------------------------------- inputs without documents


def _binary_file(path) -> str:
    """The start of a shared library: a binary file given as input by mistake."""
    with open(spm._sentencepiece.__file__, "rb") as handle:
        return write(path, handle.read(200_000))


def _no_documents_case(tmp_path, case: str) -> tuple[list[str], list[str], str]:
    """(inputs, extra flags, the file named and why) for an input that yields no document."""
    good = write(tmp_path / "in" / "good.jsonl", b"\n".join(_GOOD) + b"\n")
    if case == "binary":
        bad = _binary_file(tmp_path / "in" / "lib.so")
        return [good, bad], [], re.escape(bad) + r": no documents \([\d,]+ line\(s\), skipped: .*invalid_utf8 " \
            r"[\d,]+.*; is it a jsonl file\?\)"
    if case == "empty":
        bad = write(tmp_path / "in" / "empty.jsonl", b"")
        return [bad, good], [], re.escape(bad) + r": no documents \(the file is empty\)"
    if case == "empty_documents":
        bad = write(tmp_path / "in" / "blank_texts.jsonl", b'{"text": ""}\n' * 3)
        return [good, bad], [], re.escape(bad) + r": no documents \(3 line\(s\), skipped: empty_document 3\)"
    # A key that no line of the good file has: no document for it, even though "text" has some.
    return [good], ["--json-keys", "text", "title"], re.escape(good) + r": no documents for key\(s\) 'title' " \
        r"\(3 line\(s\), skipped: missing_key 3\)"


@pytest.mark.parametrize("case,workers", [("binary", 2), ("empty", 1), ("empty_documents", 1), ("missing_key", 2)])
def test_input_without_documents_is_an_error_naming_it(tmp_path, tokenizer_model, case, workers):
    inputs, extra, named = _no_documents_case(tmp_path, case)
    result = run_tool("--input", *inputs, "--output-prefix", tmp_path / "out" / "x", "--tokenizer-model",
                      tokenizer_model, "--workers", workers, *extra)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"preprocess_data: error: {named}; pass --allow-empty to accept an input without "
                        r"documents", last), last
    assert "Traceback" not in result.stderr
    assert_nothing_left(str(tmp_path / "out"))


def test_allow_empty_accepts_inputs_without_documents(tmp_path, tokenizer_model):
    binary = _binary_file(tmp_path / "in" / "lib.so")
    empty = write(tmp_path / "in" / "empty.jsonl", b"")
    prefix = tmp_path / "out" / "x"
    result = run_tool("--input", empty, binary, "--output-prefix", prefix, "--tokenizer-model", tokenizer_model,
                      "--allow-empty", "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert IndexedDataset(f"{prefix}_text_document", verify=True).num_documents == 0
    assert f"wrote {prefix}_text_document.bin/.idx with 0 documents (allowed by --allow-empty)" in result.stderr
    assert f"skipped {empty}:1: empty file (0 bytes)" in result.stderr


def test_mpi_input_without_documents_split_across_ranks(tmp_path, tokenizer_model):
    """The binary file is cut between the two ranks: only the reduction over the ranks can tell it is empty."""
    good = write(tmp_path / "in" / "good.jsonl", b"\n".join(_GOOD) + b"\n")
    binary = _binary_file(tmp_path / "in" / "lib.so")
    parts = tmp_path / "parts"
    common = ["--input", good, binary, "--tokenizer-model", tokenizer_model, "--tmp-dir", parts]
    result = run_tool(*common, "--output-prefix", tmp_path / "out" / "x", mpi_ranks=2, timeout=120)
    assert result.returncode == 2, result.stderr
    assert re.search(rf"{re.escape(binary)}: no documents \([\d,]+ non-blank line\(s\), every one skipped or "
                     r"empty; see the warnings above\); pass --allow-empty", result.stderr), result.stderr
    assert_nothing_left(str(tmp_path / "out"))
    assert_nothing_left(str(parts))
    result = run_tool(*common, "--output-prefix", tmp_path / "allowed" / "x", "--allow-empty", mpi_ranks=2,
                      timeout=120)
    assert result.returncode == 0, result.stderr
    assert IndexedDataset(str(tmp_path / "allowed" / "x_text_document")).num_documents == len(_GOOD)


# ---------------------------------------------------------------------- stale temporaries, full disk


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, tokenizer_model):
    out, parts, host, dead, live = tmp_path / "out", tmp_path / "parts", this_host(), _dead_pid(), os.getpid()
    stale = [out / f".x_text_document.bin.tmp-{dead}-0123abcd@{host}",
             out / f".x_text_document.idx.lengths.tmp-{dead}-0123abcd@{host}",
             out / f".x_text_document.idx.tmp-{dead}-4567abcd",  # no host: written by atomic_output or older code
             parts / f".x.tmp-{dead}-89abcdef-rank1-k2j3x9@{host}"]  # a rank's part directory
    kept = [out / f".x_text_document.bin.tmp-{live}-0123abcd@{host}",  # a live writer
            out / f".x_text_document.bin.tmp-{dead}-0123abcd@another-host",  # cannot be checked from here
            out / f".y_text_document.bin.tmp-{dead}-0123abcd@{host}",  # another output prefix
            parts / f".x.tmp-{live}-89abcdef-rank1-a1b2c3@{host}"]
    for path in stale + kept:
        if ".x.tmp-" in path.name:
            write(path / "part0.tokens", b"t" * 1500)
        else:
            write(path, b"t" * 1500)
    good = write(tmp_path / "good.jsonl", b"\n".join(_GOOD) + b"\n")
    result = run_tool("--input", good, "--output-prefix", out / "x", "--tokenizer-model", tokenizer_model,
                      "--tmp-dir", parts)
    assert result.returncode == 0, result.stderr
    for path in stale:
        assert not os.path.exists(path), path
        assert f"removed {path} (1.5 kB), left by process {dead}" in result.stderr
    assert all(os.path.exists(path) for path in kept)
    assert IndexedDataset(str(out / "x_text_document")).num_documents == len(_GOOD)


def test_kill_9_leaves_temporaries_that_the_next_run_removes(tmp_path, large_input, tokenizer_model):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, TOOL, "--input", large_input, "--output-prefix", out / "x",
                                "--tokenizer-model", tokenizer_model, "--chunk-bytes", "100000"], cwd=REPO_ROOT,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            temps = [out / n for n in os.listdir(out) if ".tmp-" in n] if out.is_dir() else []
            if any(os.path.exists(t) and os.path.getsize(t) > 0 for t in temps):
                break
            time.sleep(0.02)
        assert process.poll() is None, "the run finished before it could be killed"
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    left = sorted(n for n in os.listdir(out) if ".tmp-" in n)
    assert left and all(f"-{process.pid}-" in n for n in left)
    good = write(tmp_path / "good.jsonl", b"\n".join(_GOOD) + b"\n")
    result = run_tool("--input", good, "--output-prefix", out / "x", "--tokenizer-model", tokenizer_model)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["x_text_document.bin", "x_text_document.idx"]
    for name in left:
        assert f"removed {out / name} (" in result.stderr


class _FullDisk:
    """A file whose writes fail with ``code`` (a full disk or quota), as the kernel reports them."""

    def __init__(self, handle, code: int):
        self.handle, self.code = handle, code

    def write(self, data):
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def _fail_writes(monkeypatch, module, code: int, name_part: str) -> None:
    """Make writes to files opened by ``module`` whose name holds ``name_part`` fail with ``code``."""
    def fake_open(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return _FullDisk(handle, code) if name_part in os.path.basename(str(path)) else handle

    monkeypatch.setattr(module, "open", fake_open, raising=False)


@pytest.mark.parametrize("code,name_part,output,why", [
    (errno.ENOSPC, ".bin.tmp-", "x_text_document.bin", "no space left on device [ENOSPC]; free space or write "
                                                       "elsewhere"),
    (errno.EDQUOT, ".idx.tmp-", "x_text_document.idx", "disk quota exceeded [EDQUOT]; free space or write elsewhere"),
], ids=["bin-ENOSPC", "idx-EDQUOT"])
def test_full_disk_names_the_output_and_leaves_nothing(tmp_path, tokenizer_model, monkeypatch, capsys, code,
                                                        name_part, output, why):
    _fail_writes(monkeypatch, indexed_dataset, code, name_part)
    good = write(tmp_path / "good.jsonl", b"\n".join(_GOOD) + b"\n")
    out = tmp_path / "out"
    status = preprocess_main(["--input", good, "--output-prefix", str(out / "x"), "--tokenizer-model",
                              tokenizer_model, "--distributed", "off", "--log-interval", "1000"])
    assert status == 2
    assert f"preprocess_data: error: {out / output}: cannot write it: {why}\n" in capsys.readouterr().err
    assert_nothing_left(str(out))


def test_full_disk_in_a_ranks_part_names_the_part(tmp_path, monkeypatch):
    _fail_writes(monkeypatch, preprocess_mpi, errno.ENOSPC, ".tokens")
    part = PartWriter(str(tmp_path), "part0", np.uint16)
    with pytest.raises(OutputWriteError, match=re.escape(f"{tmp_path}/part0.tokens: cannot write it: no space")) \
            as caught:
        part.add_documents(np.arange(1, 5), np.array([4]))
    assert isinstance(caught.value, UserError) and caught.value.errno == errno.ENOSPC
    part.close()
