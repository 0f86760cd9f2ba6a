"""Tokenize jsonl corpora into Megatron indexed datasets: streaming, in parallel, robust to bad lines.

One output dataset per JSON key, ``{output_prefix}_{key}_document.bin/.idx``, with one document = one sequence
and the token dtype chosen from the vocabulary size, byte-identical to what Megatron's preprocessing writes for
the same documents. Deliberate differences from Megatron:

- Documents that tokenize to zero tokens (an empty string) are skipped and counted; Megatron writes them as
  documents with no sequences, which only wastes document-index entries.
- Bad lines (malformed JSON, a missing key, a non-string value, invalid UTF-8, a string with lone surrogates)
  are skipped, counted and reported as ``file:line: reason``; ``strict`` turns the first one into an error.
  Blank lines are skipped silently (counted). A file with no non-blank line is reported as an empty file.
- An input file that yields no document (for some JSON key) stops the run with an error naming it: an empty
  file, a binary file or one of the wrong format is a mistake, not a dataset (``allow_empty`` accepts it).
- A killed run's temporaries on the same output prefix are deleted by the next run (``remove_stale_temporaries``),
  and a full disk is an error naming the output (``megadoremi.data.output_files``).
- Memory is bounded whatever the corpus size: input is read in chunks of whole lines (``chunk_bytes``), at most
  ``2 * workers + 2`` chunks are in flight, and the writer spills its index arrays to disk.
- The output bytes do not depend on the number of workers (nor, see ``preprocess_mpi``, on the number of ranks).
- ``append_eod`` appends ``Tokenizer.eod`` (the model's eos), as Megatron's ``GPTSentencePieceTokenizer`` does.
  Megatron's ``SentencePieceTokenizer`` would append an extra ``<EOD>`` id past the model's vocabulary instead.

Entry point: ``megadoremi.data.preprocess_mpi.run_preprocess`` (one process, or MPI ranks when launched so).

Pipeline: the main process reads each file as raw bytes and cuts it into chunks ending at a newline (it never
looks at single lines: one ``count(b"\\n")`` per chunk gives the line numbers), workers decode, parse, validate
and batch-encode a chunk and send back numpy arrays (concatenated tokens and lengths per key, plus counters and
the first few issues), and the main process writes results in input order as they arrive. With one worker the
same function runs inline, without a pool.
"""

import dataclasses
import glob
import gzip
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator

import numpy as np

from megadoremi.data.indexed_dataset import IndexedDatasetWriter, best_dtype
from megadoremi.data.output_files import remove_stale_temporaries as remove_stale_files
from megadoremi.utils.cli import UserError
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_REPORTED = 10
# Raw reads from disk; a chunk is cut at the last newline of what has been read.
_READ_BYTES = 1 << 20
_UTF8_BOM = b"\xef\xbb\xbf"

# Reasons a line (or file) is bad input: reported as file:line and fatal under --strict.
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_KEY = "missing_key"
NON_STRING = "non_string"
INVALID_UNICODE = "invalid_unicode"
EMPTY_FILE = "empty_file"
CORRUPT_GZIP = "corrupt_gzip"
BAD_INPUT_REASONS = (INVALID_UTF8, MALFORMED_JSON, NOT_AN_OBJECT, MISSING_KEY, NON_STRING, INVALID_UNICODE,
                     EMPTY_FILE, CORRUPT_GZIP)
# Skipped silently (counted in the summary, never fatal).
BLANK_LINE = "blank_line"
EMPTY_DOCUMENT = "empty_document"


class PreprocessError(Exception):
    """Preprocessing cannot go on: its input (the subclasses below) or its environment (a worker died)."""


class PreprocessInputError(PreprocessError, UserError):
    """A mistake in what the user gave (configuration, input files, tokenizer); the message names it."""


class BadInputError(PreprocessInputError):
    """Bad input under ``strict``; the message is ``file:line: reason``."""


class EmptyInputError(PreprocessInputError):
    """An input file that yields no document (without ``allow_empty``); the message names it and says why."""


@dataclasses.dataclass
class PreprocessConfig:
    """What to tokenize, how, and where to write it."""

    inputs: list[str]
    output_prefix: str
    tokenizer_model: str
    json_keys: list[str] = dataclasses.field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    strict: bool = False
    allow_empty: bool = False  # accept an input file that yields no document (else it is an error naming it)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    log_interval_s: float | None = 30.0
    log_interval_docs: int | None = None
    max_reported: int = DEFAULT_MAX_REPORTED
    tmp_dir: str | None = None
    distributed: str = "auto"
    progress_bar: bool | None = None  # None: a tqdm bar when stderr is a terminal, else log lines

    def validate(self) -> None:
        """Raise PreprocessInputError naming the first bad field."""
        def fail(field, value, why):
            raise PreprocessInputError(f"preprocess config: {field}={value!r}: {why}")

        if not self.inputs:
            fail("inputs", self.inputs, "give at least one input file or glob")
        if not self.output_prefix:
            fail("output_prefix", self.output_prefix, "must not be empty")
        if not self.json_keys or any(not key for key in self.json_keys):
            fail("json_keys", self.json_keys, "give at least one non-empty key")
        if len(set(self.json_keys)) != len(self.json_keys):
            fail("json_keys", self.json_keys, "keys must be distinct (one output dataset per key)")
        if self.workers < 1:
            fail("workers", self.workers, "must be >= 1")
        if self.chunk_bytes < 1:
            fail("chunk_bytes", self.chunk_bytes, "must be >= 1")
        if self.log_interval_s is not None and self.log_interval_s <= 0:
            fail("log_interval_s", self.log_interval_s, "must be > 0")
        if self.log_interval_docs is not None and self.log_interval_docs <= 0:
            fail("log_interval_docs", self.log_interval_docs, "must be > 0")
        if self.max_reported < 0:
            fail("max_reported", self.max_reported, "must be >= 0")
        if self.distributed not in ("auto", "off", "mpi"):
            fail("distributed", self.distributed, "choose auto, off or mpi")

    def output_prefix_for(self, key: str) -> str:
        """Megatron's naming: ``{output_prefix}_{key}_document``."""
        return f"{self.output_prefix}_{key}_document"


# ------------------------------------------------------------------------------------------------------ inputs


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input file as resolved before any work (size in bytes on disk; compressed: a .gz file)."""

    path: str
    size: int
    compressed: bool


@dataclasses.dataclass(frozen=True)
class InputRange:
    """Lines of ``files[file_index]`` whose first byte lies in ``[start, end)`` (a .gz file is always whole)."""

    file_index: int
    start: int
    end: int


def resolve_inputs(patterns: list[str]) -> list[InputFile]:
    """Files in the given order, each glob's matches sorted; a missing file or empty glob is an error."""
    files = []
    for pattern in patterns:
        if os.path.exists(pattern) or not glob.has_magic(pattern):
            paths = [pattern]
        else:
            paths = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
            if not paths:
                raise PreprocessInputError(f"{pattern}: no input file matches this pattern")
        for path in paths:
            if not os.path.exists(path):
                raise PreprocessInputError(f"{path}: input file not found")
            if not os.path.isfile(path):
                raise PreprocessInputError(f"{path}: input is not a regular file")
            if not os.access(path, os.R_OK):
                raise PreprocessInputError(f"{path}: input file is not readable")
            files.append(InputFile(path, os.path.getsize(path), path.endswith(".gz")))
    return files


# ------------------------------------------------------------------------------------------------------ reading


@dataclasses.dataclass
class Chunk:
    """Whole lines ``first_line .. first_line + num_lines - 1`` of one file, as raw bytes."""

    file_index: int
    first_line: int
    blob: bytes
    disk_bytes: int  # bytes of the file on disk consumed (compressed size for .gz), for progress


@dataclasses.dataclass
class FileIssue:
    """A problem with a file rather than a line (corrupt gzip stream)."""

    file_index: int
    line: int
    reason: str
    detail: str


@dataclasses.dataclass
class FileEnd:
    """All lines of a range were read; ``whole`` when the range is the whole file."""

    file_index: int
    whole: bool


def _num_lines(blob: bytes) -> int:
    return blob.count(b"\n") + (0 if blob.endswith(b"\n") else 1)


def iter_jobs(files: list[InputFile], ranges: list[InputRange], first_lines: list[int],
              chunk_bytes: int) -> Iterator[Chunk | FileIssue | FileEnd]:
    """Chunks of whole lines of each range in order, each range followed by its FileEnd."""
    for rng, first_line in zip(ranges, first_lines):
        f = files[rng.file_index]
        whole = rng.start == 0 and rng.end >= f.size
        line = first_line
        if f.compressed:
            reader = _iter_gzip(f.path, chunk_bytes)
        else:
            reader = _iter_plain(f.path, rng.start, rng.end, chunk_bytes)
        try:
            for blob, disk_bytes in reader:
                yield Chunk(rng.file_index, line, blob, disk_bytes)
                line += _num_lines(blob)
        except (EOFError, zlib.error, gzip.BadGzipFile) as error:
            detail = str(error) or type(error).__name__
            yield FileIssue(rng.file_index, line, CORRUPT_GZIP, f"corrupt gzip stream, rest of file skipped ({detail})")
        except OSError as error:  # vanished or became unreadable since it was resolved, or an I/O error
            raise PreprocessInputError(f"{f.path}: cannot read it ({error.strerror or error})") from error
        yield FileEnd(rng.file_index, whole)


def _cut_chunks(read: Callable[[], tuple[bytes, int]], chunk_bytes: int, end: int | None,
                position: int) -> Iterator[tuple[bytes, int]]:
    """Chunks of whole lines from ``read()`` (block, disk bytes), stopping after the line that holds byte
    ``end - 1`` when ``end`` is given; ``position`` is the stream offset of the first byte read."""
    pending = b""
    pending_disk = 0
    while True:
        block, disk = read()
        if not block:
            if pending:
                yield pending, pending_disk
            return
        if position == 0 and block.startswith(_UTF8_BOM):
            block = block[len(_UTF8_BOM):]
            position = len(_UTF8_BOM)
        buffer_start = position - len(pending)
        position += len(block)
        pending += block
        pending_disk += disk
        if end is not None and position >= end:
            # The range ends inside what we hold: finish the line that holds byte end - 1, then stop.
            cut = pending.find(b"\n", max(end - 1 - buffer_start, 0))
            while cut < 0:
                more, disk = read()
                if not more:
                    break
                cut = more.find(b"\n")
                cut = -1 if cut < 0 else len(pending) + cut
                pending += more
                pending_disk += disk
            yield (pending if cut < 0 else pending[:cut + 1]), pending_disk
            return
        if len(pending) >= chunk_bytes:
            cut = pending.rfind(b"\n")
            if cut >= 0:
                yield pending[:cut + 1], pending_disk
                pending, pending_disk = pending[cut + 1:], 0


def _iter_plain(path: str, start: int, end: int, chunk_bytes: int) -> Iterator[tuple[bytes, int]]:
    with open(path, "rb") as handle:
        position = start
        if start > 0:
            # The line holding byte start - 1 belongs to the previous range: skip to its end.
            handle.seek(start - 1)
            if handle.read(1) != b"\n":
                handle.readline()
            position = handle.tell()
        if position >= end:
            return
        read_size = max(min(chunk_bytes, _READ_BYTES), 1 << 16)

        def read():
            block = handle.read(read_size)
            return block, len(block)

        yield from _cut_chunks(read, chunk_bytes, end, position)


def _iter_gzip(path: str, chunk_bytes: int) -> Iterator[tuple[bytes, int]]:
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as handle:
        read_size = max(min(chunk_bytes, _READ_BYTES), 1 << 16)
        last = [0]

        def read():
            block = handle.read(read_size)
            disk, last[0] = raw.tell() - last[0], raw.tell()
            return block, disk

        yield from _cut_chunks(read, chunk_bytes, None, 0)


# ----------------------------------------------------------------------------------------------------- encoding


@dataclasses.dataclass
class ChunkResult:
    """What a worker sends back for one chunk: numpy arrays per key, counters, the first few issues."""

    tokens: list[np.ndarray]  # per key: (sum of lengths,) token dtype, documents concatenated
    lengths: list[np.ndarray]  # per key: (num documents,) int32, all > 0
    num_lines: int
    num_nonblank: int
    num_bytes: int
    skipped: Counter
    issues: list[tuple[int, str, str]]  # (line, reason, detail), in line order, at most max_reported


class ChunkEncoder:
    """Decodes, parses, validates and tokenizes chunks of jsonl lines (one per worker process, or inline)."""

    def __init__(self, tokenizer, json_keys: list[str], append_eod: bool, max_reported: int):
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.eod = tokenizer.eod if append_eod else None
        self.dtype = best_dtype(tokenizer.vocab_size)
        self.max_reported = max_reported

    def encode(self, first_line: int, blob: bytes) -> ChunkResult:
        """Tokenize every good line of ``blob`` (whole lines starting at line number ``first_line``)."""
        lines = blob.split(b"\n")
        if not lines[-1]:
            lines.pop()
        keys = self.json_keys
        texts: list[list[str]] = [[] for _ in keys]
        text_lines: list[list[int]] = [[] for _ in keys]
        issues: list[tuple[int, str, str]] = []
        skipped: Counter = Counter()
        num_blank = 0
        loads = json.loads
        for number, raw in enumerate(lines, first_line):
            if not raw or raw.isspace():
                num_blank += 1
                continue
            try:
                record = loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                issues.append((number, INVALID_UTF8, f"invalid UTF-8 (byte 0x{raw[error.start]:02x} at offset "
                                                     f"{error.start})"))
                continue
            except (ValueError, RecursionError) as error:  # RecursionError: absurdly deep nesting
                where = f" (column {error.colno})" if hasattr(error, "colno") else ""
                issues.append((number, MALFORMED_JSON, f"malformed JSON: {getattr(error, 'msg', error)}{where}"))
                continue
            if type(record) is not dict:
                issues.append((number, NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}"))
                continue
            for k, key in enumerate(keys):
                value = record.get(key, _MISSING)
                if type(value) is str:
                    texts[k].append(value)
                    text_lines[k].append(number)
                elif value is _MISSING:
                    issues.append((number, MISSING_KEY, f"missing key {key!r}"))
                else:
                    issues.append((number, NON_STRING, f"key {key!r} holds {_json_type(value)}, not a string"))
        tokens, lengths = [], []
        for k in range(len(keys)):
            key_tokens, key_lengths, num_empty = self._encode_texts(texts[k], text_lines[k], issues)
            tokens.append(key_tokens)
            lengths.append(key_lengths)
            if num_empty:
                skipped[EMPTY_DOCUMENT] += num_empty
        if num_blank:
            skipped[BLANK_LINE] = num_blank
        for _, reason, _ in issues:
            skipped[reason] += 1
        issues.sort(key=lambda issue: issue[0])
        return ChunkResult(tokens, lengths, num_lines=len(lines), num_nonblank=len(lines) - num_blank,
                           num_bytes=len(blob), skipped=skipped, issues=issues[:self.max_reported])

    def _encode_texts(self, texts, text_lines, issues) -> tuple[np.ndarray, np.ndarray, int]:
        try:
            ids = self.tokenizer.encode_batch(texts, num_threads=1)
        except (TypeError, RuntimeError, UnicodeError):
            # A string with lone surrogates (a "\ud800" escape) cannot be encoded; find and drop those.
            good = []
            for text, number in zip(texts, text_lines):
                try:
                    text.encode("utf-8")
                    good.append(text)
                except UnicodeEncodeError as error:
                    issues.append((number, INVALID_UNICODE,
                                   f"string holds a lone surrogate (\\u{ord(text[error.start]):04x})"))
            ids = self.tokenizer.encode_batch(good, num_threads=1)
        # Megatron appends eod only to non-empty documents; empty ones are dropped below.
        if self.eod is not None:
            eod = self.eod
            for doc in ids:
                if doc:
                    doc.append(eod)
        lengths = np.fromiter(map(len, ids), np.int32, len(ids))
        total = int(lengths.sum(dtype=np.int64))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, total)
        nonempty = lengths > 0
        num_empty = int(lengths.size - np.count_nonzero(nonempty))
        if num_empty:
            lengths = lengths[nonempty]
        return tokens, lengths, num_empty


_MISSING = object()


def _json_type(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


# One encoder per worker process, set by the pool initializer (the standard Pool idiom for per-process state).
_WORKER_ENCODER: ChunkEncoder | None = None


def _init_worker(tokenizer, json_keys, append_eod, max_reported) -> None:
    global _WORKER_ENCODER
    # Ctrl-C goes to the whole process group: the main process handles it and terminates the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER_ENCODER = ChunkEncoder(tokenizer, json_keys, append_eod, max_reported)


def _encode_in_worker(first_line: int, blob: bytes) -> ChunkResult:
    return _WORKER_ENCODER.encode(first_line, blob)


# ------------------------------------------------------------------------------------------------------ running


@dataclasses.dataclass
class PreprocessStats:
    """Totals of a run, or of one rank's share (``merge`` adds another share)."""

    json_keys: list[str]
    num_files: int = 0
    num_lines: int = 0
    num_bytes: int = 0
    docs: Counter = dataclasses.field(default_factory=Counter)  # key -> documents written
    tokens: Counter = dataclasses.field(default_factory=Counter)  # key -> tokens written
    skipped: Counter = dataclasses.field(default_factory=Counter)  # reason -> lines (or files, or documents)
    seconds: float = 0.0
    # Non-blank lines (file index -> count) and documents ((file index, key index) -> count) seen in files this
    # share holds only part of: whether they are empty is decided after a reduction over the shares.
    partial_nonblank: Counter = dataclasses.field(default_factory=Counter)
    partial_docs: Counter = dataclasses.field(default_factory=Counter)

    @property
    def num_docs(self) -> int:
        return sum(self.docs.values())

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens.values())

    def merge(self, other: "PreprocessStats") -> None:
        """Add another share's totals (time is the longest share's)."""
        self.num_files += other.num_files
        self.num_lines += other.num_lines
        self.num_bytes += other.num_bytes
        self.docs.update(other.docs)
        self.tokens.update(other.tokens)
        self.skipped.update(other.skipped)
        self.partial_nonblank.update(other.partial_nonblank)
        self.partial_docs.update(other.partial_docs)
        self.seconds = max(self.seconds, other.seconds)

    def summary(self) -> str:
        """One line: documents, tokens, bytes, time, rates, skipped lines by reason."""
        seconds = max(self.seconds, 1e-9)
        per_key = "; ".join(f"{key}: {self.docs[key]:,} docs, {self.tokens[key]:,} tokens" for key in self.json_keys)
        skipped = ", ".join(f"{reason} {count:,}" for reason, count in sorted(self.skipped.items())) or "none"
        return (f"{self.num_docs:,} docs, {self.num_tokens:,} tokens ({per_key}) from {self.num_lines:,} lines, "
                f"{self.num_bytes / 1e6:,.2f} MB in {self.num_files} file(s), {self.seconds:.2f} s: "
                f"{self.num_docs / seconds:,.0f} docs/s, {self.num_bytes / 1e6 / seconds:,.2f} MB/s; "
                f"skipped: {skipped}")


class IssueReporter:
    """Formats bad input as ``file:line: reason``: logs the first few, or raises under ``strict``."""

    def __init__(self, files: list[InputFile], strict: bool, max_reported: int):
        self.files = files
        self.strict = strict
        self.max_reported = max_reported
        self.num_reported = 0

    def report(self, file_index: int, line: int, reason: str, detail: str) -> None:
        message = f"{self.files[file_index].path}:{line}: {detail}"
        if self.strict:
            raise BadInputError(message)
        if self.num_reported < self.max_reported:
            self.num_reported += 1
            suffix = " (further bad input is only counted)" if self.num_reported == self.max_reported else ""
            logger.warning("skipped %s [%s]%s", message, reason, suffix)


def empty_file_detail(f: InputFile) -> str:
    """The reason text for a file without documents."""
    return "empty file (0 bytes)" if f.size == 0 else "empty file (only blank lines, no documents)"


def empty_input_message(f: InputFile, empty_keys: list[str], json_keys: list[str], num_lines: int | None = None,
                        skipped: Counter | None = None, num_nonblank: int | None = None) -> str:
    """Why ``f`` stops the run: no document for ``empty_keys``, with what its lines were when known (``num_lines``
    and ``skipped``; a file split across ranks only knows ``num_nonblank``)."""
    what = "no documents" if len(empty_keys) == len(json_keys) else \
        f"no documents for key(s) {', '.join(map(repr, empty_keys))}"
    if f.size == 0:
        why = "the file is empty"
    elif num_lines is None:
        why = f"{num_nonblank or 0:,} non-blank line(s), every one skipped or empty; see the warnings above"
    else:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted((skipped or {}).items()) if count)
        why = f"{num_lines:,} line(s), skipped: {reasons or 'none'}"
        if skipped and skipped[INVALID_UTF8] + skipped[MALFORMED_JSON] >= max(num_lines // 2, 1):
            why += "; is it a jsonl file?"
    return f"{f.path}: {what} ({why}); pass --allow-empty to accept an input without documents"


class Progress:
    """A tqdm bar (bytes read, docs/s, MB/s, tokens) on a terminal, else a log line every interval."""

    def __init__(self, total_disk_bytes: int, bar: bool | None, interval_s: float | None,
                 interval_docs: int | None, label: str = "tokenizing", enabled: bool = True):
        self.enabled = enabled
        self.started = time.perf_counter()
        self.docs = self.tokens = self.text_bytes = 0
        self._bar = None
        self._interval_s, self._interval_docs = interval_s, interval_docs
        self._next_log_s = interval_s
        self._next_log_docs = interval_docs
        self.label = label
        self.total_disk_bytes = total_disk_bytes
        # The bar is created at the first update, after any worker pool was forked: tqdm starts a thread.
        self._use_bar = enabled and (sys.stderr.isatty() if bar is None else bar)

    def update(self, docs: int, tokens: int, text_bytes: int, disk_bytes: int) -> None:
        """Count one chunk's results; redraw the bar or log a line when one is due."""
        self.docs += docs
        self.tokens += tokens
        self.text_bytes += text_bytes
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        if self._use_bar:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total_disk_bytes, unit="B", unit_scale=True, desc=self.label,
                                 file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
            self._bar.set_postfix_str(f"{self.docs:,} docs, {self.docs / elapsed:,.0f} docs/s, "
                                      f"{self.text_bytes / 1e6 / elapsed:,.2f} MB/s, {self.tokens:,} tokens",
                                      refresh=False)
            self._bar.update(disk_bytes)
            return
        due_s = self._next_log_s is not None and elapsed >= self._next_log_s
        due_docs = self._next_log_docs is not None and self.docs >= self._next_log_docs
        if due_s or due_docs:
            logger.info("%s: %s docs, %s tokens, %.1f MB, %.0f s: %.0f docs/s, %.2f MB/s", self.label,
                        f"{self.docs:,}", f"{self.tokens:,}", self.text_bytes / 1e6, elapsed, self.docs / elapsed,
                        self.text_bytes / 1e6 / elapsed)
            if self._interval_s is not None:
                self._next_log_s = elapsed + self._interval_s
            if self._interval_docs is not None:
                self._next_log_docs = (self.docs // self._interval_docs + 1) * self._interval_docs

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._use_bar = False


def tokenize_ranges(files: list[InputFile], ranges: list[InputRange], first_lines: list[int], sinks: list,
                    tokenizer, config: PreprocessConfig, progress: Progress, reporter: IssueReporter,
                    start_method: str | None = None, poll: Callable[[], None] | None = None) -> PreprocessStats:
    """Tokenize ``ranges`` in order into ``sinks`` (one per JSON key, anything with ``add_documents``).

    ``first_lines[i]`` is the line number of the first line of ``ranges[i]``. ``poll`` is called after every
    chunk (the distributed driver uses it to stop early when another rank failed). A whole file that yields no
    document for a key raises EmptyInputError as soon as it is read, unless ``config.allow_empty``; for a file
    read only in part, its counts go to ``partial_nonblank`` / ``partial_docs`` for the caller to decide.
    """
    started = time.perf_counter()
    keys = list(config.json_keys)
    stats = PreprocessStats(keys, num_files=sum(1 for r in ranges if r.start == 0))
    nonblank_by_file: Counter = Counter()
    lines_by_file: Counter = Counter()
    docs_by_file: dict[int, Counter] = {}  # file index -> key index -> documents
    skipped_by_file: dict[int, Counter] = {}  # file index -> reason -> lines
    broken_files: set[int] = set()  # corrupt gzip: reported once as such, not also as empty

    def consume(job, result: ChunkResult | None) -> None:
        index = job.file_index
        if isinstance(job, Chunk):
            for line, reason, detail in result.issues:
                reporter.report(index, line, reason, detail)
            num_docs = num_tokens = 0
            file_docs = docs_by_file.setdefault(index, Counter())
            for k, (key, sink, tokens, lengths) in enumerate(zip(keys, sinks, result.tokens, result.lengths)):
                if lengths.size:
                    sink.add_documents(tokens, lengths)
                stats.docs[key] += int(lengths.size)
                stats.tokens[key] += int(tokens.size)
                file_docs[k] += int(lengths.size)
                num_docs += int(lengths.size)
                num_tokens += int(tokens.size)
            stats.num_lines += result.num_lines
            stats.num_bytes += result.num_bytes
            stats.skipped.update(result.skipped)
            skipped_by_file.setdefault(index, Counter()).update(result.skipped)
            nonblank_by_file[index] += result.num_nonblank
            lines_by_file[index] += result.num_lines
            progress.update(num_docs, num_tokens, result.num_bytes, job.disk_bytes)
        elif isinstance(job, FileIssue):
            stats.skipped[job.reason] += 1
            skipped_by_file.setdefault(index, Counter())[job.reason] += 1
            broken_files.add(index)
            reporter.report(index, job.line, job.reason, job.detail)
        elif isinstance(job, FileEnd):
            file_docs = docs_by_file.get(index, Counter())
            if not job.whole:
                stats.partial_nonblank[index] += nonblank_by_file[index]
                for k in range(len(keys)):
                    stats.partial_docs[index, k] += file_docs[k]
            else:
                no_lines = nonblank_by_file[index] == 0 and index not in broken_files
                if no_lines:
                    stats.skipped[EMPTY_FILE] += 1
                empty_keys = [key for k, key in enumerate(keys) if file_docs[k] == 0]
                fatal = bool(empty_keys) and not config.allow_empty
                if no_lines and (config.strict or not fatal):  # a warning, or strict's file:1: error
                    reporter.report(index, 1, EMPTY_FILE, empty_file_detail(files[index]))
                if fatal:
                    raise EmptyInputError(empty_input_message(files[index], empty_keys, keys, lines_by_file[index],
                                                              skipped_by_file.get(index)))
        if poll is not None:
            poll()

    jobs = iter_jobs(files, ranges, first_lines, config.chunk_bytes)
    encoder_args = (tokenizer, list(config.json_keys), config.append_eod, config.max_reported)
    if config.workers == 1:
        encoder = ChunkEncoder(*encoder_args)
        for job in jobs:
            consume(job, encoder.encode(job.first_line, job.blob) if isinstance(job, Chunk) else None)
    else:
        _run_pool(jobs, encoder_args, config.workers, start_method, consume)
    stats.seconds = time.perf_counter() - started
    return stats


def _run_pool(jobs, encoder_args, workers: int, start_method: str | None, consume) -> None:
    """Encode chunks in a process pool, consuming results in input order with a bounded window in flight."""
    context = multiprocessing.get_context(start_method)
    pool = context.Pool(workers, initializer=_init_worker, initargs=encoder_args)
    worker_pids = {process.pid for process in getattr(pool, "_pool", [])}
    max_in_flight = 2 * workers + 2
    window: deque = deque()
    ok = False
    try:
        for job in jobs:
            pending = pool.apply_async(_encode_in_worker, (job.first_line, job.blob)) if isinstance(job, Chunk) \
                else None
            window.append((job, pending))
            while len(window) >= max_in_flight:
                job, pending = window.popleft()
                consume(job, _wait(pool, pending, worker_pids))
        while window:
            job, pending = window.popleft()
            consume(job, _wait(pool, pending, worker_pids))
        ok = True
    finally:
        window.clear()
        if ok:
            pool.close()
        else:
            # Ctrl-C, a strict failure or a crash: stop the workers now rather than finishing their chunks.
            pool.terminate()
        pool.join()


def _wait(pool, pending, worker_pids: set[int]) -> ChunkResult | None:
    if pending is None:
        return None
    while True:
        try:
            return pending.get(timeout=1.0)
        except multiprocessing.TimeoutError:
            # Pool silently replaces a worker that died (OOM killer, segfault) and its chunk never completes.
            alive = {process.pid for process in getattr(pool, "_pool", [])}
            if worker_pids and alive != worker_pids:
                raise PreprocessError("a tokenizer worker process died (killed by the OOM killer?); "
                                      "no output was written") from None


def load_tokenizer(model_path: str):
    """The Tokenizer, with loading problems as PreprocessInputError."""
    from megadoremi.data.tokenizer import Tokenizer

    try:
        return Tokenizer(model_path)
    except (OSError, ValueError) as error:
        raise PreprocessInputError(f"--tokenizer-model: {error}") from None


def part_root(config: PreprocessConfig) -> str:
    """Where distributed ranks other than 0 put their part directories: --tmp-dir, $TMPDIR, else the output's
    directory."""
    return config.tmp_dir or os.environ.get("TMPDIR") or os.path.dirname(os.path.abspath(config.output_prefix))


def remove_stale_temporaries(config: PreprocessConfig, outputs: bool = True) -> int:
    """Delete what killed runs on this output prefix left behind (whose process is gone from this host): the
    outputs' temporary files (``outputs``) and ranks' part directories. Returns the bytes freed."""
    freed = 0
    if outputs:
        for key in config.json_keys:
            freed += IndexedDatasetWriter.remove_stale_temporaries(config.output_prefix_for(key))
    freed += remove_stale_files(part_root(config), [os.path.basename(config.output_prefix)])
    return freed


def run_single(config: PreprocessConfig, start_method: str | None = None) -> PreprocessStats:
    """One process (plus ``config.workers`` pool workers) writes every output."""
    files = resolve_inputs(config.inputs)
    tokenizer = load_tokenizer(config.tokenizer_model)
    dtype = best_dtype(tokenizer.vocab_size)
    ranges = [InputRange(index, 0, f.size) for index, f in enumerate(files)]
    logger.info("tokenizing %d file(s), %.2f MB, keys %s, %d worker(s), vocab %d -> %s tokens",
                len(files), sum(f.size for f in files) / 1e6, config.json_keys, config.workers,
                tokenizer.vocab_size, dtype)
    progress = Progress(sum(f.size for f in files), config.progress_bar, config.log_interval_s,
                        config.log_interval_docs)
    remove_stale_temporaries(config)
    writers: list[IndexedDatasetWriter] = []
    try:
        for key in config.json_keys:
            writers.append(IndexedDatasetWriter(config.output_prefix_for(key), dtype))
        stats = tokenize_ranges(files, ranges, [1] * len(ranges), writers, tokenizer, config, progress,
                                IssueReporter(files, config.strict, config.max_reported), start_method)
        progress.close()
        for writer in writers:
            writer.finalize()
    except BaseException:
        progress.close()
        for writer in writers:
            writer.abort()
        raise
    log_summary(stats, config)
    return stats


def log_summary(stats: PreprocessStats, config: PreprocessConfig) -> None:
    """The final summary line, totals of bad input by reason, and the outputs written."""
    logger.info("done: %s", stats.summary())
    bad = sum(count for reason, count in stats.skipped.items() if reason in BAD_INPUT_REASONS)
    if bad:
        logger.warning("skipped %s bad input line(s)/file(s) (%s); pass --strict to fail on bad input instead",
                       f"{bad:,}", ", ".join(f"{reason} {count:,}" for reason, count in sorted(stats.skipped.items())
                                            if reason in BAD_INPUT_REASONS))
    for key in config.json_keys:
        if stats.docs[key] == 0:
            logger.warning("wrote %s.bin/.idx with 0 documents (allowed by --allow-empty)",
                           config.output_prefix_for(key))
        else:
            logger.info("wrote %s.bin/.idx", config.output_prefix_for(key))
