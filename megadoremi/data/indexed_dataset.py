"""Megatron-compatible indexed datasets (MMIDIDX version 1): a streaming writer and a memory-mapped reader.

A dataset is a path prefix P with two files. ``P.bin`` holds every sequence's tokens concatenated
(little-endian, no header). ``P.idx`` holds a 34-byte header (magic, version, dtype code, number of sequences S,
number of documents + 1 = D) and three arrays: sequence lengths (int32, S), byte pointers (int64, S) and the
document index (int64, D; starts at 0, ends at S). The bytes are identical to what megatron-core's
``IndexedDatasetBuilder`` writes, and megatron-core reads ours (checked in tests/test_indexed_dataset.py).
"""

import contextlib
import os
import shutil
import struct

import numpy as np

from megadoremi.data.output_files import host_temp_path, remove_stale_temporaries, writing
from megadoremi.utils.cli import UserError
from megadoremi.utils.fs import remove_quietly

INDEX_MAGIC = b"MMIDIDX\x00\x00"
TNT_MAGIC = b"TNTIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 34  # magic (9) + version (8) + dtype code (1) + num sequences (8) + num documents + 1 (8)
FAIRSEQ_2019_HEADER_SIZE = 26  # the same without the document count (and no document index)

# Megatron's DType codes; 6 and 7 (float64/float32) are not token datasets and are refused.
DTYPE_BY_CODE = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
CODE_BY_DTYPE = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}

# Entries of the lengths / document arrays buffered in memory before they spill to disk (P.idx + suffix).
_SPILL_ENTRIES = 1 << 20
_LENGTHS_SPILL, _DOCS_SPILL = ".lengths", ".docs"
_COPY_CHUNK_BYTES = 64 << 20


class IndexedDatasetError(UserError, ValueError):
    """A dataset file is missing, malformed or inconsistent; the message names the file."""


def data_file_path(path_prefix: str) -> str:
    """``P.bin``."""
    return f"{path_prefix}.bin"


def index_file_path(path_prefix: str) -> str:
    """``P.idx``."""
    return f"{path_prefix}.idx"


def best_dtype(vocab_size: int) -> np.dtype:
    """Megatron's token dtype rule: uint16 when the vocabulary has fewer than 65500 entries, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in CODE_BY_DTYPE:
        raise IndexedDatasetError(
            f"unsupported token dtype {dtype}; use one of {sorted(str(d) for d in CODE_BY_DTYPE)}"
        )
    return dtype


def read_index_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """Parse and validate the header of ``idx_path``: returns (dtype, num_sequences, num_documents + 1)."""
    try:
        file_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as handle:
            header = handle.read(HEADER_SIZE)
    except FileNotFoundError:
        raise IndexedDatasetError(f"{idx_path}: index file not found") from None
    except OSError as error:  # a directory, no permission
        raise IndexedDatasetError(f"{idx_path}: cannot read the index file ({error.strerror or error})") from None
    if header[: len(TNT_MAGIC)] == TNT_MAGIC:
        raise IndexedDatasetError(
            f"{idx_path}: TNTIDX index (the old 'lazy'/'cached' fairseq format) is not supported; "
            "re-run preprocessing to produce an MMIDIDX (mmap) dataset"
        )
    if len(header) < len(INDEX_MAGIC) or header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise IndexedDatasetError(
            f"{idx_path}: not a Megatron index file (magic {header[:9]!r}, expected {INDEX_MAGIC!r})"
        )
    if len(header) < 17:
        raise IndexedDatasetError(f"{idx_path}: truncated header ({file_size} bytes)")
    (version,) = struct.unpack("<Q", header[9:17])
    if version != INDEX_VERSION:
        raise IndexedDatasetError(f"{idx_path}: unsupported index version {version} (only version 1 is supported)")
    if len(header) < 26:
        raise IndexedDatasetError(f"{idx_path}: truncated header ({file_size} bytes, need {HEADER_SIZE})")
    dtype_code = header[17]
    if dtype_code not in DTYPE_BY_CODE:
        raise IndexedDatasetError(
            f"{idx_path}: unsupported dtype code {dtype_code} "
            f"(token datasets use {sorted(DTYPE_BY_CODE)}; 6/7 are floating point)"
        )
    (num_sequences,) = struct.unpack("<Q", header[18:26])
    if file_size == FAIRSEQ_2019_HEADER_SIZE + 12 * num_sequences:
        raise IndexedDatasetError(
            f"{idx_path}: this is a 2019 fairseq-style index without a document index; "
            "it cannot be read as MMIDIDX v1 (re-run preprocessing, or rebuild the index with one document "
            "per sequence)"
        )
    if len(header) < HEADER_SIZE:
        raise IndexedDatasetError(f"{idx_path}: truncated header ({file_size} bytes, need {HEADER_SIZE})")
    (num_doc_entries,) = struct.unpack("<Q", header[26:34])
    expected = HEADER_SIZE + 12 * num_sequences + 8 * num_doc_entries
    if file_size != expected:
        what = "truncated" if file_size < expected else "has trailing bytes"
        raise IndexedDatasetError(
            f"{idx_path}: {what}: {num_sequences} sequences and {num_doc_entries} document entries need "
            f"{expected} bytes, the file has {file_size}"
        )
    if num_doc_entries < 1:
        raise IndexedDatasetError(f"{idx_path}: document index is empty (it must start with 0)")
    return DTYPE_BY_CODE[dtype_code], int(num_sequences), int(num_doc_entries)


class IndexedDataset:
    """Memory-mapped reader: ``len(ds)`` sequences, ``ds[i]`` -> numpy tokens, ``ds.get(i, offset, length)``."""

    def __init__(self, path_prefix: str, verify: bool = False):
        self.path_prefix = str(path_prefix)
        self._open(verify)

    def _open(self, verify: bool) -> None:
        idx_path, bin_path = index_file_path(self.path_prefix), data_file_path(self.path_prefix)
        if not os.path.exists(bin_path):
            raise IndexedDatasetError(f"{bin_path}: data file not found (prefix {self.path_prefix!r})")
        self.dtype, num_sequences, num_doc_entries = read_index_header(idx_path)
        self._idx_mmap = np.memmap(idx_path, mode="r", dtype=np.uint8)
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._idx_mmap, np.int32, num_sequences, offset)
        offset += 4 * num_sequences
        self.sequence_pointers = np.frombuffer(self._idx_mmap, np.int64, num_sequences, offset)
        offset += 8 * num_sequences
        self.document_indices = np.frombuffer(self._idx_mmap, np.int64, num_doc_entries, offset)

        bin_size = os.path.getsize(bin_path)
        self._bin_mmap = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size else np.empty(0, np.uint8)
        itemsize = self.dtype.itemsize
        docs = self.document_indices
        if docs[0] != 0 or docs[-1] != num_sequences:
            raise IndexedDatasetError(
                f"{idx_path}: document index must run from 0 to {num_sequences}, found {docs[0]}..{docs[-1]}"
            )
        if num_sequences:
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
            if self.sequence_pointers[0] != 0 or end != bin_size:
                raise IndexedDatasetError(
                    f"{bin_path}: size {bin_size} bytes does not match the index "
                    f"({idx_path} says the tokens end at byte {end}); the .bin is truncated or belongs to "
                    "another dataset"
                )
        elif bin_size:
            raise IndexedDatasetError(f"{bin_path}: {bin_size} bytes but {idx_path} lists no sequences")
        if verify:
            self.verify()

    def verify(self) -> None:
        """Full O(S + D) consistency check of lengths, pointers and the document index."""
        idx_path = index_file_path(self.path_prefix)
        lengths = self.sequence_lengths
        if lengths.size and lengths.min() < 0:
            bad = int(np.argmin(lengths))
            raise IndexedDatasetError(f"{idx_path}: sequence {bad} has negative length {lengths[bad]}")
        expected = np.zeros(lengths.size, np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
        expected *= self.dtype.itemsize
        mismatch = np.flatnonzero(expected != self.sequence_pointers)
        if mismatch.size:
            i = int(mismatch[0])
            raise IndexedDatasetError(
                f"{idx_path}: pointer of sequence {i} is {self.sequence_pointers[i]}, lengths add up to {expected[i]}"
            )
        if np.any(np.diff(self.document_indices) < 0):
            raise IndexedDatasetError(f"{idx_path}: document index is not non-decreasing")

    def __getstate__(self):
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.path_prefix = state["path_prefix"]
        self._open(verify=False)

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` as a read-only numpy view."""
        num = len(self)
        if idx < 0:
            idx += num
        if not 0 <= idx < num:
            raise IndexError(f"sequence index {idx} out of range for {num} sequences in {self.path_prefix}")
        seq_length = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_length - offset
        if offset < 0 or length < 0 or offset + length > seq_length:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {idx} of length {seq_length}"
            )
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_mmap, self.dtype, length, start)

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.size - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @staticmethod
    def exists(path_prefix: str) -> bool:
        """Whether both files of the dataset exist."""
        return os.path.exists(index_file_path(path_prefix)) and os.path.exists(data_file_path(path_prefix))


class _SpillArray:
    """An append-only array of one dtype kept in a bounded memory buffer that spills to a temporary file."""

    def __init__(self, dtype, spill_path: str):
        self.dtype = np.dtype(dtype)
        self.spill_path = spill_path
        self._chunks: list[np.ndarray] = []
        self._buffered = 0
        self._spilled = 0
        self._handle = None

    def __len__(self) -> int:
        return self._spilled + self._buffered

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self.dtype)
        if values.size:
            self._chunks.append(values.copy() if values.base is not None else values)
            self._buffered += values.size
            if self._buffered >= _SPILL_ENTRIES:
                self._spill()

    def _spill(self) -> None:
        if self._handle is None:
            self._handle = open(self.spill_path, "w+b")
        for chunk in self._chunks:
            self._handle.write(chunk.tobytes())
        self._spilled += self._buffered
        self._chunks, self._buffered = [], 0

    def iter_chunks(self):
        """All values in order, in chunks of at most a few million entries."""
        if self._handle is not None:
            self._handle.flush()
            self._handle.seek(0)
            step = _SPILL_ENTRIES * self.dtype.itemsize
            while True:
                raw = self._handle.read(step)
                if not raw:
                    break
                yield np.frombuffer(raw, self.dtype)
        yield from self._chunks

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):  # a full disk fails the final flush; the file goes anyway
                self._handle.close()
            self._handle = None
        remove_quietly(self.spill_path)


class IndexedDatasetWriter:
    """Streaming writer of ``P.bin`` / ``P.idx``: memory stays bounded whatever the number of documents.

    Everything is written under temporary names in the output directory (tagged with the pid and host, see
    ``megadoremi.data.output_files``); ``finalize()`` writes the index and renames both files into place (the
    ``.idx`` last), ``abort()`` (or an exception inside ``with``) deletes them. A crash therefore never leaves a
    complete-looking pair, and ``remove_stale_temporaries`` deletes what a killed writer left. A full disk (or
    quota, or permissions) raises an OutputWriteError naming the output file.
    """

    def __init__(self, path_prefix: str, dtype=np.uint16):
        self.path_prefix = str(path_prefix)
        self.dtype = _check_dtype(dtype)
        self._info = np.iinfo(self.dtype)
        directory = os.path.dirname(os.path.abspath(self.path_prefix))
        self._bin_path = data_file_path(self.path_prefix)
        self._idx_path = index_file_path(self.path_prefix)
        self._bin_tmp = host_temp_path(self._bin_path)
        self._idx_tmp = host_temp_path(self._idx_path)
        with writing(self._bin_path):
            os.makedirs(directory, exist_ok=True)
            self._bin = open(self._bin_tmp, "wb")
        self._lengths = _SpillArray(np.int32, host_temp_path(self._idx_path + _LENGTHS_SPILL))
        self._doc_ends = _SpillArray(np.int64, host_temp_path(self._idx_path + _DOCS_SPILL))
        self.num_tokens = 0
        self._closed = False

    @staticmethod
    def remove_stale_temporaries(path_prefix: str) -> int:
        """Delete the temporaries of ``path_prefix``'s files left by writers that were killed; returns bytes freed."""
        directory, base = os.path.split(os.path.abspath(path_prefix))
        names = [f"{base}.bin", f"{base}.idx", f"{base}.idx{_LENGTHS_SPILL}", f"{base}.idx{_DOCS_SPILL}"]
        return remove_stale_temporaries(directory, names)

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._doc_ends)

    def _tokens_as_dtype(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.dtype == self.dtype:
            return tokens
        if tokens.size:
            if tokens.dtype.kind not in "iu":
                raise IndexedDatasetError(f"{self.path_prefix}: tokens must be integers, got dtype {tokens.dtype}")
            low, high = int(tokens.min()), int(tokens.max())
            if low < self._info.min or high > self._info.max:
                raise IndexedDatasetError(
                    f"{self.path_prefix}: token id {high if high > self._info.max else low} does not fit dtype "
                    f"{self.dtype} (vocabulary too large for this dataset's dtype?)"
                )
        return tokens.astype(self.dtype)

    def add_document(self, tokens, sequence_lengths=None) -> None:
        """One document; its tokens form one sequence unless ``sequence_lengths`` splits them into several."""
        tokens = self._tokens_as_dtype(tokens)
        lengths = [tokens.size] if sequence_lengths is None else list(sequence_lengths)
        if sum(lengths) != tokens.size:
            raise IndexedDatasetError(
                f"{self.path_prefix}: sequence lengths {lengths} do not add up to the document's {tokens.size} tokens"
            )
        self._write(tokens, np.asarray(lengths, np.int64), np.asarray([len(lengths)], np.int64))

    def add_documents(self, tokens, lengths) -> None:
        """Many single-sequence documents at once: ``tokens`` concatenated, ``lengths`` one per document."""
        lengths = np.asarray(lengths, np.int64)
        tokens = self._tokens_as_dtype(tokens)
        if int(lengths.sum()) != tokens.size:
            raise IndexedDatasetError(
                f"{self.path_prefix}: document lengths add up to {int(lengths.sum())}, got {tokens.size} tokens"
            )
        self._write(tokens, lengths, np.arange(1, lengths.size + 1, dtype=np.int64))

    def add_sequences(self, tokens, lengths, document_ends) -> None:
        """General form: sequences with ``lengths`` and ``document_ends`` = cumulative sequence counts per
        document, relative to this call (``[2, 3]``: a 2-sequence document then a 1-sequence one)."""
        lengths = np.asarray(lengths, np.int64)
        document_ends = np.asarray(document_ends, np.int64)
        tokens = self._tokens_as_dtype(tokens)
        if int(lengths.sum()) != tokens.size:
            raise IndexedDatasetError(
                f"{self.path_prefix}: sequence lengths add up to {int(lengths.sum())}, got {tokens.size} tokens"
            )
        if document_ends.size and (document_ends[-1] != lengths.size or np.any(np.diff(document_ends) < 0)):
            raise IndexedDatasetError(f"{self.path_prefix}: document ends must be non-decreasing and end at "
                                      f"{lengths.size}")
        self._write(tokens, lengths, document_ends)

    def _write(self, tokens: np.ndarray, lengths: np.ndarray, relative_doc_ends: np.ndarray) -> None:
        if self._closed:
            raise IndexedDatasetError(f"{self.path_prefix}: writer is already finalized or aborted")
        if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise IndexedDatasetError(f"{self.path_prefix}: sequence length out of int32 range")
        base = self.num_sequences
        with writing(self._bin_path):
            self._bin.write(tokens.tobytes())
        self.num_tokens += int(tokens.size)
        with writing(self._idx_path):
            self._lengths.extend(lengths)
            self._doc_ends.extend(relative_doc_ends + base)

    def add_index(self, path_prefix: str) -> None:
        """Append every sequence and document of another dataset (same dtype), streaming its files."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{path_prefix}: dtype {other.dtype} differs from the output's {self.dtype}; cannot merge"
            )
        if self._closed:
            raise IndexedDatasetError(f"{self.path_prefix}: writer is already finalized or aborted")
        base = self.num_sequences
        with open(data_file_path(path_prefix), "rb") as source, writing(self._bin_path):
            shutil.copyfileobj(source, self._bin, _COPY_CHUNK_BYTES)
        self.num_tokens += other.num_tokens
        with writing(self._idx_path):
            for start in range(0, len(other), _SPILL_ENTRIES):
                self._lengths.extend(other.sequence_lengths[start:start + _SPILL_ENTRIES])
            # The merge must extend the document index: skip the other's leading 0, shift by our sequence count.
            other_docs = other.document_indices[1:]
            for start in range(0, other_docs.size, _SPILL_ENTRIES):
                self._doc_ends.extend(other_docs[start:start + _SPILL_ENTRIES] + base)

    def _write_index(self) -> None:
        itemsize = self.dtype.itemsize
        with open(self._idx_tmp, "wb") as idx:
            idx.write(INDEX_MAGIC)
            idx.write(struct.pack("<Q", INDEX_VERSION))
            idx.write(struct.pack("<B", CODE_BY_DTYPE[self.dtype]))
            idx.write(struct.pack("<Q", self.num_sequences))
            idx.write(struct.pack("<Q", self.num_documents + 1))
            for chunk in self._lengths.iter_chunks():
                idx.write(chunk.tobytes())
            # Pointers: exclusive prefix sum of lengths x itemsize, computed chunk by chunk.
            carry = 0
            for chunk in self._lengths.iter_chunks():
                sums = np.cumsum(chunk, dtype=np.int64)
                pointers = np.empty_like(sums)
                pointers[0] = carry
                pointers[1:] = carry + sums[:-1] * itemsize
                idx.write(pointers.tobytes())
                carry += int(sums[-1]) * itemsize
            idx.write(np.zeros(1, np.int64).tobytes())
            for chunk in self._doc_ends.iter_chunks():
                idx.write(chunk.tobytes())
            idx.flush()
            os.fsync(idx.fileno())

    def finalize(self) -> None:
        """Write the index and move both files into place (an existing dataset at the prefix is replaced)."""
        if self._closed:
            raise IndexedDatasetError(f"{self.path_prefix}: writer is already finalized or aborted")
        try:
            with writing(self._bin_path):
                self._bin.flush()
                os.fsync(self._bin.fileno())
                self._bin.close()
            with writing(self._idx_path):
                self._write_index()
                # Remove a previous index first: a crash between the two renames leaves a .bin without .idx,
                # never an old .idx next to a new .bin.
                remove_quietly(self._idx_path)
            with writing(self._bin_path):
                os.replace(self._bin_tmp, self._bin_path)
            with writing(self._idx_path):
                os.replace(self._idx_tmp, self._idx_path)
        except BaseException:
            self.abort()
            raise
        self._cleanup()

    def abort(self) -> None:
        """Discard everything written so far."""
        if not self._bin.closed:
            with contextlib.suppress(OSError):  # a full disk fails the final flush; the file goes anyway
                self._bin.close()
        remove_quietly(self._bin_tmp)
        remove_quietly(self._idx_tmp)
        self._cleanup()

    def _cleanup(self) -> None:
        self._lengths.close()
        self._doc_ends.close()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._closed:
            return
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
