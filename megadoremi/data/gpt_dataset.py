"""GPT training samples over an indexed dataset: fixed-length token windows read across document boundaries.

A ``GPTSampleDataset`` exposes ``num_samples`` samples of ``seq_length + 1`` tokens (inputs and shifted labels);
consecutive samples overlap by one token. Three index arrays drive it, as in Megatron:

- ``doc_idx`` (E * D,): the documents of the range, shuffled independently in each of the E epochs, so every
  epoch sees every document exactly once before any repeats;
- ``sample_idx`` (num_samples + 1, 2): for the token at stream position ``i * seq_length``, the position in
  ``doc_idx`` of the document holding it and the token's offset inside that document. Sample i reads from
  entry i to entry i + 1, both ends included;
- ``shuffle_idx`` (num_samples,): a seeded permutation of the samples.

They are computed with vectorized numpy (cumsum + searchsorted; no Python loop over documents or samples) and
cached as ``.npy`` files; see ``GPTSampleDataset`` for the cache layout, its key and multi-process building.
"""

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from megadoremi.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from megadoremi.utils.fs import atomic_output, file_lock
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

# Bump whenever the arrays a given configuration produces change: old caches are then never reused.
INDEX_ALGORITHM_VERSION = 1
DEFAULT_CACHE_DIRNAME = "index-cache"
USER_CACHE_DIR = os.path.join("~", ".cache", "megadoremi", DEFAULT_CACHE_DIRNAME)
_FINGERPRINT_BYTES = 1 << 20  # the .idx's first and last MiB are hashed into the cache key
_SEARCH_CHUNK = 1 << 24  # sample boundaries located per searchsorted call (bounds temporary memory)
_INT32_MAX = np.iinfo(np.int32).max
_ARRAY_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")


# --------------------------------------------------------------------------------------------- splits


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` -> ``[0.969, 0.03, 0.001]``: comma- (or slash-) separated ratios, padded to 3, normalized."""
    text = str(split).strip()
    if not text:
        raise ValueError("split is empty: expected ratios like '969,30,1' (train,valid,test)")
    separator = "," if "," in text else "/"
    parts = [part.strip() for part in text.split(separator)]
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"split {split!r}: {part!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"split {split!r}: ratio {part!r} must be finite and non-negative")
        values.append(value)
    values += [0.0] * (3 - len(values))
    total = sum(values)
    if total <= 0:
        raise ValueError(f"split {split!r}: ratios are all zero")
    return [value / total for value in values]


def split_document_ranges(num_documents: int, split: str | Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous ``(start, end)`` document ranges, one per split ratio, with megatron-core's rounding.

    Bounds are ``round(cumulative_fraction * num_documents)`` (Python's round, as megatron-core does); the
    last range always ends at ``num_documents``. A ratio of zero gives an empty range.
    """
    if num_documents < 0:
        raise ValueError(f"num_documents must be non-negative, got {num_documents}")
    fractions = parse_split(split) if isinstance(split, str) else parse_split(",".join(map(str, split)))
    bounds, cumulative = [0], 0.0
    for fraction in fractions:
        cumulative += fraction
        bounds.append(min(max(int(round(cumulative * float(num_documents))), bounds[-1]), num_documents))
    bounds[-1] = num_documents
    return list(zip(bounds[:-1], bounds[1:]))


# ------------------------------------------------------------------------------------------ the indices


def num_epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """The smallest E with ``E * tokens_per_epoch >= num_samples * seq_length + 1``."""
    tokens_needed = num_samples * seq_length + 1
    return max(1, -(-tokens_needed // tokens_per_epoch))


def samples_per_epoch(tokens_per_epoch: int, seq_length: int) -> int:
    """Samples one pass over the documents yields: ``floor((tokens_per_epoch - 1) / seq_length)``."""
    return max(0, (tokens_per_epoch - 1) // seq_length)


def _index_dtype(max_value: int) -> np.dtype:
    # int32 halves the cache where it is safe; int64 once values can pass 2^31.
    return np.dtype(np.int32) if max_value <= _INT32_MAX else np.dtype(np.int64)


def build_sample_indices(
    sequence_lengths: np.ndarray,
    document_range: tuple[int, int],
    seq_length: int,
    num_samples: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute ``(doc_idx, sample_idx, shuffle_idx)`` (see the module docstring); no caching, no I/O.

    ``sequence_lengths`` is the whole dataset's length array; ``doc_idx`` holds absolute document ids.
    Cost: O(E*D) for the document order, O(S log(E*D)) for the sample boundaries, O(S) for the shuffle.
    """
    start, end = document_range
    lengths = np.asarray(sequence_lengths[start:end], dtype=np.int64)  # (D,)
    tokens_per_epoch = int(lengths.sum())
    if tokens_per_epoch < seq_length + 1:
        raise ValueError(
            f"documents [{start}, {end}) hold {tokens_per_epoch} tokens; a sample needs {seq_length + 1}"
        )
    num_epochs = num_epochs_needed(tokens_per_epoch, num_samples, seq_length)
    doc_rng, shuffle_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))

    # Document order: each epoch's row is an independent permutation of the range. (E, D) -> (E*D,)
    num_docs = end - start
    doc_dtype = _index_dtype(max(end - 1, 0))
    doc_idx = np.broadcast_to(np.arange(start, end, dtype=doc_dtype), (num_epochs, num_docs))
    doc_idx = doc_rng.permuted(doc_idx, axis=1).reshape(-1)

    # Token stream: document j of doc_idx covers [doc_ends[j] - len_j, doc_ends[j]). (E*D,)
    stream_lengths = lengths[doc_idx - start]
    doc_ends = np.cumsum(stream_lengths)
    del stream_lengths

    # Sample boundary i is stream token i * seq_length; its document is the first j with doc_ends[j] > token
    # (side="right" steps over empty documents), its offset the distance from that document's start.
    sample_dtype = _index_dtype(max(doc_idx.size, int(lengths.max(initial=0))))
    sample_idx = np.empty((num_samples + 1, 2), dtype=sample_dtype)
    for chunk_start in range(0, num_samples + 1, _SEARCH_CHUNK):
        chunk_end = min(chunk_start + _SEARCH_CHUNK, num_samples + 1)
        tokens = np.arange(chunk_start, chunk_end, dtype=np.int64) * seq_length
        positions = np.searchsorted(doc_ends, tokens, side="right")
        doc_starts = doc_ends[positions] - lengths[doc_idx[positions] - start]
        sample_idx[chunk_start:chunk_end, 0] = positions
        sample_idx[chunk_start:chunk_end, 1] = tokens - doc_starts

    shuffle_idx = shuffle_rng.permutation(np.arange(num_samples, dtype=_index_dtype(max(num_samples - 1, 0))))
    return doc_idx, sample_idx, shuffle_idx


# ---------------------------------------------------------------------------------------- cache helpers


def data_fingerprint(path_prefix: str) -> dict:
    """What identifies a dataset's content for the cache key: sizes and mtimes of both files, plus an md5
    of the ``.idx``'s first and last MiB (catches a rewrite that kept the size and the mtime)."""
    fingerprint = {}
    for kind, path in (("bin", data_file_path(path_prefix)), ("idx", index_file_path(path_prefix))):
        stat = os.stat(path)
        fingerprint[f"{kind}_size"] = stat.st_size
        fingerprint[f"{kind}_mtime_ns"] = stat.st_mtime_ns
    digest = hashlib.md5()
    with open(index_file_path(path_prefix), "rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BYTES))
        size = fingerprint["idx_size"]
        if size > _FINGERPRINT_BYTES:
            handle.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            digest.update(handle.read(_FINGERPRINT_BYTES))
    fingerprint["idx_md5_head_tail"] = digest.hexdigest()
    return fingerprint


def default_cache_dir(path_prefix: str) -> str:
    """``<dataset dir>/index-cache`` when that directory is (or can be made) writable, else
    ``~/.cache/megadoremi/index-cache`` with a warning. Pass ``cache_dir`` explicitly on clusters whose data
    directories are read-only, and make it a directory every rank sees when ranks share the build."""
    data_dir = os.path.dirname(os.path.abspath(path_prefix))
    candidate = os.path.join(data_dir, DEFAULT_CACHE_DIRNAME)
    writable = os.access(candidate, os.W_OK) if os.path.isdir(candidate) else os.access(data_dir, os.W_OK)
    if writable:
        return candidate
    fallback = os.path.expanduser(USER_CACHE_DIR)
    logger.warning(
        "%s is not writable; caching sample indices in %s (set cache_dir to a directory all ranks share)",
        data_dir,
        fallback,
    )
    return fallback


def _load_array(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:
        # numpy cannot memory-map a zero-sized array (num_samples = 0); it is tiny, read it.
        return np.load(path)


# ------------------------------------------------------------------------------------------- the dataset


class GPTSampleDataset:
    """``seq_length + 1``-token samples over documents ``document_range`` of an ``IndexedDataset``.

    ``len(ds)`` is ``num_samples`` (when None: one epoch, ``floor((tokens_per_epoch - 1) / seq_length)``);
    ``ds[i]`` is an int64 array of ``seq_length + 1`` tokens. Document ranges index the dataset's sequences,
    which are its documents when preprocessing did not split sentences (megatron-core does the same).

    Cache: in ``cache_dir`` (default ``default_cache_dir(prefix)``: ``<dataset dir>/index-cache``), files
    ``<basename>-<key>.{doc_idx,sample_idx,shuffle_idx}.npy`` and ``<basename>-<key>.json``; ``key`` is an
    md5 over the configuration (absolute prefix, range, seq_length, resolved num_samples, seed,
    ``INDEX_ALGORITHM_VERSION``) and ``data_fingerprint(prefix)``, so a dataset rewritten in place gets new
    indices. Each file is written under a temporary name and renamed; the JSON description is written last and
    marks the set complete.

    Building: by default every process takes ``file_lock(<basename>-<key>.lock)``; the first builds, the others
    block on the lock, then find the files complete and memory-map them. For torch.distributed, pass
    ``barrier`` (e.g. ``torch.distributed.barrier``) and ``is_builder`` (e.g. ``rank == 0``, or local rank 0
    when the cache directory is node-local): the builder builds (still under the lock) and then calls
    ``barrier()``; the others call ``barrier()`` at once and load. Every rank must construct the dataset
    (a collective call); the builder reaches the barrier even when building fails, so the others then fail
    with a clear error instead of hanging.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        *,
        document_range: tuple[int, int] | None = None,
        seq_length: int,
        num_samples: int | None = None,
        seed: int,
        cache_dir: str | None = None,
        name: str = "",
        barrier: Callable[[], None] | None = None,
        is_builder: bool = True,
    ):
        self.indexed = indexed
        self.path_prefix = os.path.abspath(indexed.path_prefix)
        self.name = name or os.path.basename(self.path_prefix)
        num_docs_total = len(indexed)
        start, end = (0, num_docs_total) if document_range is None else map(int, document_range)
        if not 0 <= start <= end <= num_docs_total:
            raise ValueError(
                f"{self.path_prefix}: document range [{start}, {end}) is outside its {num_docs_total} documents"
            )
        if int(seq_length) != seq_length or seq_length < 1:
            raise ValueError(f"{self.path_prefix}: seq_length must be a positive integer, got {seq_length!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"{self.path_prefix}: seed must be a non-negative integer, got {seed!r}")
        self.document_range = (start, end)
        self.seq_length = int(seq_length)
        self.seed = int(seed)

        self.tokens_per_epoch = int(indexed.sequence_lengths[start:end].sum(dtype=np.int64))
        if self.tokens_per_epoch < self.seq_length + 1:
            what = "no tokens" if self.tokens_per_epoch == 0 else f"only {self.tokens_per_epoch} tokens"
            raise ValueError(
                f"dataset {self.path_prefix} ({self.name}): documents [{start}, {end}) hold {what}; a sample "
                f"needs seq_length + 1 = {self.seq_length + 1} (use a larger split of this dataset or a "
                "shorter sequence)"
            )
        if num_samples is None:
            num_samples = samples_per_epoch(self.tokens_per_epoch, self.seq_length)
        if int(num_samples) != num_samples or num_samples < 0:
            raise ValueError(f"{self.path_prefix}: num_samples must be a non-negative integer, got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.tokens_needed = self.num_samples * self.seq_length + 1
        self.num_epochs = num_epochs_needed(self.tokens_per_epoch, self.num_samples, self.seq_length)

        self.cache_dir = os.path.abspath(cache_dir if cache_dir is not None else default_cache_dir(self.path_prefix))
        self.description = {
            "algorithm_version": INDEX_ALGORITHM_VERSION,
            "path_prefix": self.path_prefix,
            "document_range": [start, end],
            "seq_length": self.seq_length,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "data": data_fingerprint(self.path_prefix),
        }
        self.cache_key = hashlib.md5(json.dumps(self.description, sort_keys=True).encode()).hexdigest()
        self.built_index = False  # True in the one process that computed the arrays
        self._load_or_build(barrier, is_builder)

    # -- cache

    def _cache_path(self, suffix: str) -> str:
        return os.path.join(self.cache_dir, f"{os.path.basename(self.path_prefix)}-{self.cache_key}{suffix}")

    @property
    def cache_files(self) -> dict[str, str]:
        """Paths of the cached arrays and of the description file (``"description"``)."""
        files = {array: self._cache_path(f".{array}.npy") for array in _ARRAY_NAMES}
        files["description"] = self._cache_path(".json")
        return files

    def _cache_complete(self) -> bool:
        files = self.cache_files
        if not all(os.path.exists(path) for path in files.values()):
            return False
        try:
            with open(files["description"]) as handle:
                return json.load(handle).get("cache_key") == self.cache_key
        except (OSError, ValueError):
            return False

    def _build_and_save(self) -> None:
        began = time.perf_counter()
        logger.info(
            "building sample index for %s (%s): documents [%d, %d), %d samples of %d tokens, %d epoch(s) -> %s",
            self.name, self.path_prefix, *self.document_range, self.num_samples, self.seq_length + 1,
            self.num_epochs, self.cache_dir,
        )
        arrays = build_sample_indices(
            self.indexed.sequence_lengths, self.document_range, self.seq_length, self.num_samples, self.seed
        )
        os.makedirs(self.cache_dir, exist_ok=True)
        files = self.cache_files
        for array_name, array in zip(_ARRAY_NAMES, arrays):
            with atomic_output(files[array_name]) as handle:
                np.save(handle, array)
        seconds = time.perf_counter() - began
        description = dict(
            self.description,
            cache_key=self.cache_key,
            name=self.name,
            num_epochs=self.num_epochs,
            tokens_per_epoch=self.tokens_per_epoch,
            build_seconds=round(seconds, 3),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        # Written last: its presence (with our key) marks the three arrays complete.
        with atomic_output(files["description"], "w") as handle:
            json.dump(description, handle, indent=2, sort_keys=True)
        self.built_index = True
        logger.info("built sample index for %s in %.2f s", self.name, seconds)

    def _build_under_lock(self) -> None:
        if self._cache_complete():
            return
        os.makedirs(self.cache_dir, exist_ok=True)
        with file_lock(self._cache_path(".lock")):
            if not self._cache_complete():  # another process may have built it while we waited
                self._build_and_save()

    def _load_or_build(self, barrier, is_builder: bool) -> None:
        if barrier is None:
            self._build_under_lock()
        elif is_builder:
            try:
                self._build_under_lock()
            finally:
                barrier()
        else:
            barrier()
            if not self._cache_complete():
                raise RuntimeError(
                    f"sample index for {self.path_prefix} ({self.name}) is missing from {self.cache_dir} after the "
                    f"barrier ({self.cache_files['description']}): the building rank failed, or cache_dir is not "
                    "shared with it (use a shared cache_dir, or one builder per node for node-local caches)"
                )
        self._load()

    def _load(self) -> None:
        files = self.cache_files
        self.doc_idx = _load_array(files["doc_idx"])  # (E * D,)
        self.sample_idx = _load_array(files["sample_idx"])  # (num_samples + 1, 2)
        self.shuffle_idx = _load_array(files["shuffle_idx"])  # (num_samples,)
        expected = {
            "doc_idx": (self.num_epochs * (self.document_range[1] - self.document_range[0]),),
            "sample_idx": (self.num_samples + 1, 2),
            "shuffle_idx": (self.num_samples,),
        }
        for array_name, shape in expected.items():
            if getattr(self, array_name).shape != shape:
                raise RuntimeError(
                    f"{files[array_name]}: shape {getattr(self, array_name).shape}, expected {shape}; "
                    "the cache is corrupt, delete it"
                )

    # Workers started with spawn re-map the cached files instead of receiving copies of the arrays.
    def __getstate__(self):
        state = self.__dict__.copy()
        for array_name in _ARRAY_NAMES:
            state.pop(array_name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    # -- samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        """Sample ``index`` (after the sample shuffle): int64 tokens, shape (seq_length + 1,)."""
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples of {self.name}")
        return self.unshuffled_sample(int(self.shuffle_idx[index]))

    def unshuffled_sample(self, position: int) -> np.ndarray:
        """The ``position``-th window of the token stream (before the sample shuffle)."""
        first_doc, first_offset = (int(v) for v in self.sample_idx[position])
        last_doc, last_offset = (int(v) for v in self.sample_idx[position + 1])
        get = self.indexed.get
        if first_doc == last_doc:
            tokens = get(int(self.doc_idx[first_doc]), first_offset, last_offset - first_offset + 1)
            return tokens.astype(np.int64)
        pieces = [get(int(self.doc_idx[first_doc]), first_offset)]
        pieces += [get(int(doc)) for doc in self.doc_idx[first_doc + 1 : last_doc]]
        pieces.append(get(int(self.doc_idx[last_doc]), 0, last_offset + 1))
        return np.concatenate(pieces).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"GPTSampleDataset({self.name!r}, documents={self.document_range}, seq_length={self.seq_length}, "
            f"num_samples={self.num_samples}, epochs={self.num_epochs})"
        )
