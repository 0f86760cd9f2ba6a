"""GPT samples: content against a naive reference, per-epoch shuffling, splits, the index cache and its locking."""

import hashlib
import json
import multiprocessing
import os
import pickle
import sys
import time

import numpy as np
import pytest

from megadoremi.data import gpt_dataset
from megadoremi.data.gpt_dataset import (
    GPTSampleDataset,
    build_sample_indices,
    parse_split,
    split_document_ranges,
)
from megadoremi.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter


def write_dataset(prefix, lengths, seed=0, dtype=np.uint16):
    """A dataset with one document per entry of ``lengths``, random tokens; returns the opened dataset."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(prefix), dtype) as writer:
        lengths = np.asarray(lengths, np.int64)
        writer.add_documents(rng.integers(0, 60000, int(lengths.sum())), lengths)
    return IndexedDataset(str(prefix))


def random_lengths(num_docs, seed, max_length=40, num_long=1, long_length=700):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_length, num_docs)
    lengths[rng.choice(num_docs, size=max(1, num_docs // 8), replace=False)] = 0  # empty documents
    lengths[rng.choice(num_docs, size=num_long, replace=False)] = long_length  # very long documents
    return lengths


def reference_windows(indexed, doc_order, seq_length, num_windows):
    """Naive reference: concatenate the documents in order, cut windows of seq_length + 1 with stride seq_length."""
    stream = np.concatenate([np.asarray(indexed.get(int(doc)), np.int64) for doc in doc_order])
    assert stream.size >= num_windows * seq_length + 1
    return [stream[j * seq_length : j * seq_length + seq_length + 1] for j in range(num_windows)]


def check_against_reference(ds, indexed):
    start, end = ds.document_range
    num_docs = end - start
    assert ds.doc_idx.size == ds.num_epochs * num_docs
    for epoch in range(ds.num_epochs):
        # Every epoch is one permutation of the range: each document once before any repeat.
        assert sorted(ds.doc_idx[epoch * num_docs : (epoch + 1) * num_docs]) == list(range(start, end))
    np.testing.assert_array_equal(np.sort(ds.shuffle_idx), np.arange(len(ds)))
    windows = reference_windows(indexed, ds.doc_idx, ds.seq_length, len(ds))
    for i in range(len(ds)):
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (ds.seq_length + 1,)
        np.testing.assert_array_equal(sample, windows[int(ds.shuffle_idx[i])], err_msg=f"sample {i}")


# ------------------------------------------------------------------------------------------------ splits


def test_parse_split():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("98/2") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("100") == [1.0, 0.0, 0.0]
    assert parse_split(" 1, 1 ,2 ") == [0.25, 0.25, 0.5]
    for bad, fragment in [("", "empty"), ("a,1", "not a number"), ("1,-1,0", "non-negative"),
                          ("0,0,0", "all zero"), ("nan,1", "finite"), ("1,,1", "not a number")]:
        with pytest.raises(ValueError, match=fragment):
            parse_split(bad)


def test_split_document_ranges():
    assert split_document_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges(10, "1,1,1") == [(0, 3), (3, 7), (7, 10)]
    assert split_document_ranges(7, "100,0,0") == [(0, 7), (7, 7), (7, 7)]
    assert split_document_ranges(0, "969,30,1") == [(0, 0), (0, 0), (0, 0)]
    for num_docs in [1, 2, 3, 17, 999, 1001, 123457]:
        for split in ["969,30,1", "1,1,1", "0,1,0", "9,1", [0.5, 0.25, 0.25]]:
            ranges = split_document_ranges(num_docs, split)
            assert ranges[0][0] == 0 and ranges[-1][1] == num_docs
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous
            assert all(start <= end for start, end in ranges)


def test_split_document_ranges_match_megatron_core():
    pytest.importorskip("torch")
    config = pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_config")
    for split in ["969,30,1", "1,1,1", "98,2,0", "7,2,1", "1,2,3"]:
        matrix = config.convert_split_vector_to_split_matrix(config.parse_and_normalize_split(split))
        for num_docs in [1, 3, 10, 33, 1000, 54321]:
            expected = [
                (0, 0) if bookends is None
                else (int(round(bookends[0] * float(num_docs))), int(round(bookends[1] * float(num_docs))))
                for bookends in matrix
            ]
            ours = split_document_ranges(num_docs, split)
            # megatron-core marks an empty split None; compare the non-empty ones.
            assert [r for r in ours if r[0] < r[1]] == [r for r in expected if r[0] < r[1]], (split, num_docs)


# ------------------------------------------------------------------------------------------- sample content


@pytest.mark.parametrize(
    "num_docs,seq_length,num_samples,doc_range,seed",
    [
        (60, 16, 200, None, 1),  # several epochs
        (40, 100, 30, None, 2),  # seq_length larger than most documents
        (80, 7, None, (10, 70), 3),  # one epoch of a sub-range
        (25, 33, 150, (5, 20), 4),  # many epochs of a sub-range
        (3, 1, 50, None, 5),  # seq_length 1
    ],
)
def test_samples_equal_naive_reference(tmp_path, num_docs, seq_length, num_samples, doc_range, seed):
    lengths = random_lengths(num_docs, seed)
    indexed = write_dataset(tmp_path / "data", lengths, seed=seed)
    ds = GPTSampleDataset(indexed, document_range=doc_range, seq_length=seq_length, num_samples=num_samples,
                          seed=seed, cache_dir=str(tmp_path / "cache"))
    start, end = doc_range or (0, num_docs)
    tokens_per_epoch = int(lengths[start:end].sum())
    if num_samples is None:
        assert len(ds) == (tokens_per_epoch - 1) // seq_length and ds.num_epochs == 1
    else:
        assert len(ds) == num_samples
    check_against_reference(ds, indexed)


def test_runs_of_empty_documents(tmp_path):
    # Empty documents at both ends of the range and runs of them in the middle.
    lengths = [0, 0, 5, 0, 0, 0, 9, 0, 3, 0, 0]
    indexed = write_dataset(tmp_path / "data", lengths)
    ds = GPTSampleDataset(indexed, seq_length=4, num_samples=40, seed=0, cache_dir=str(tmp_path / "cache"))
    check_against_reference(ds, indexed)


def test_epoch_count_is_the_smallest_sufficient(tmp_path):
    indexed = write_dataset(tmp_path / "data", [10, 0, 11])  # 21 tokens per epoch
    cache = str(tmp_path / "cache")
    # (num_samples, seq_length, epochs): tokens needed n * s + 1 against 21 per epoch, e.g. 41 fits in 2
    # epochs (42 tokens), 43 needs 3, 21 fits in 1, 23 needs 2.
    cases = [(10, 4, 2), (5, 4, 1), (4, 5, 1), (21, 2, 3), (1, 20, 1), (2, 10, 1), (2, 11, 2)]
    for num_samples, seq_length, epochs in cases:
        ds = GPTSampleDataset(indexed, seq_length=seq_length, num_samples=num_samples, seed=0, cache_dir=cache)
        assert ds.num_epochs == epochs, (num_samples, seq_length)
        check_against_reference(ds, indexed)


def test_document_order_is_shuffled_per_epoch(tmp_path):
    indexed = write_dataset(tmp_path / "data", np.full(50, 8))
    cache = str(tmp_path / "cache")
    ds = GPTSampleDataset(indexed, seq_length=8, num_samples=199, seed=7, cache_dir=cache)  # 4 epochs
    epochs = ds.doc_idx.reshape(ds.num_epochs, 50)
    assert ds.num_epochs == 4
    for row in epochs:
        assert sorted(row) == list(range(50))
    assert len({tuple(row) for row in epochs}) == 4  # each epoch has its own order
    assert not np.array_equal(epochs[0], np.arange(50))
    again = GPTSampleDataset(indexed, seq_length=8, num_samples=199, seed=7, cache_dir=str(tmp_path / "other"))
    np.testing.assert_array_equal(again.doc_idx, ds.doc_idx)
    np.testing.assert_array_equal(again.shuffle_idx, ds.shuffle_idx)
    other_seed = GPTSampleDataset(indexed, seq_length=8, num_samples=199, seed=8, cache_dir=cache)
    assert not np.array_equal(other_seed.doc_idx, ds.doc_idx)
    assert not np.array_equal(other_seed.shuffle_idx, ds.shuffle_idx)


def test_too_few_tokens_names_the_dataset(tmp_path):
    indexed = write_dataset(tmp_path / "tiny", [3, 0, 4, 0])
    cache = str(tmp_path / "cache")
    prefix = str(tmp_path / "tiny")
    with pytest.raises(ValueError, match=f"{prefix}.*no tokens"):
        GPTSampleDataset(indexed, document_range=(3, 4), seq_length=2, seed=0, cache_dir=cache)
    with pytest.raises(ValueError, match=f"{prefix}.*no tokens"):
        GPTSampleDataset(indexed, document_range=(2, 2), seq_length=2, seed=0, cache_dir=cache)
    with pytest.raises(ValueError, match=f"{prefix}.*only 7 tokens.*8"):
        GPTSampleDataset(indexed, seq_length=7, seed=0, cache_dir=cache)
    with pytest.raises(ValueError, match="outside"):
        GPTSampleDataset(indexed, document_range=(0, 5), seq_length=2, seed=0, cache_dir=cache)
    ds = GPTSampleDataset(indexed, seq_length=6, seed=0, cache_dir=cache)  # exactly seq_length + 1 tokens
    assert len(ds) == 1
    check_against_reference(ds, indexed)
    with pytest.raises(IndexError):
        ds[1]
    np.testing.assert_array_equal(ds[-1], ds[0])


def test_stream_positions_past_2_31_use_int64(tmp_path):
    # 2.2e9 stream tokens: sample boundaries pass 2^31 and must not wrap.
    lengths = [1000, 0, 1500]
    indexed = write_dataset(tmp_path / "data", lengths)
    seq_length, num_samples = 2000, 1_100_000
    doc_idx, sample_idx, shuffle_idx = build_sample_indices(
        indexed.sequence_lengths, (0, 3), seq_length, num_samples, seed=0
    )
    assert num_samples * seq_length > 2**31
    stream_ends = np.cumsum(np.asarray(indexed.sequence_lengths, np.int64)[doc_idx])
    for sample in [0, 1, 1_073_741, 1_073_742, num_samples]:
        position, offset = (int(v) for v in sample_idx[sample])
        token = sample * seq_length
        doc_start = int(stream_ends[position]) - int(indexed.sequence_lengths[doc_idx[position]])
        assert doc_start + offset == token and 0 <= offset < int(indexed.sequence_lengths[doc_idx[position]])


# ------------------------------------------------------------------------------------------ vectorization


def _lines_executed_in_module(function, *args):
    """How many Python lines of gpt_dataset.py run during ``function(*args)``."""
    target = gpt_dataset.__file__
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != target:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        function(*args)
    finally:
        sys.settrace(None)
    return count


def test_building_has_no_python_loop_over_documents_or_samples():
    rng = np.random.default_rng(0)
    counts = []
    for num_docs in [2_000, 20_000, 200_000]:
        lengths = rng.integers(0, 300, num_docs).astype(np.int32)
        num_samples = int(lengths.sum()) * 2 // 64  # two epochs
        counts.append(_lines_executed_in_module(build_sample_indices, lengths, (0, num_docs), 64, num_samples, 1))
    # The same Python work for 100x the documents and samples: the cost is all in numpy.
    assert counts[0] == counts[1] == counts[2], counts


def test_one_million_documents_builds(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 1000, 1_000_000).astype(np.int32)
    began = time.perf_counter()
    num_samples = (2 * int(lengths.sum()) - 1) // 1024  # two epochs
    doc_idx, sample_idx, shuffle_idx = build_sample_indices(lengths, (0, lengths.size), 1024, num_samples, seed=3)
    seconds = time.perf_counter() - began
    assert doc_idx.size == 2_000_000 and shuffle_idx.size == sample_idx.shape[0] - 1
    print(f"1M documents, {shuffle_idx.size} samples: {seconds:.2f} s")  # reported, not asserted


# ------------------------------------------------------------------------------------------------- cache


def _digest(ds):
    digest = hashlib.md5()
    for array in (ds.doc_idx, ds.sample_idx, ds.shuffle_idx):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def test_cache_is_reused_and_equals_a_fresh_build(tmp_path):
    indexed = write_dataset(tmp_path / "data", random_lengths(100, 0))
    cache = str(tmp_path / "cache")
    first = GPTSampleDataset(indexed, seq_length=32, num_samples=300, seed=5, cache_dir=cache, name="web")
    assert first.built_index
    files = first.cache_files
    assert sorted(os.listdir(cache)) == sorted(
        [os.path.basename(p) for p in files.values()] + [os.path.basename(files["description"])[:-5] + ".lock"]
    )
    with open(files["description"]) as handle:
        description = json.load(handle)
    assert description["cache_key"] == first.cache_key and description["num_epochs"] == first.num_epochs
    assert description["data"]["idx_size"] == os.path.getsize(str(tmp_path / "data.idx"))
    second = GPTSampleDataset(indexed, seq_length=32, num_samples=300, seed=5, cache_dir=cache, name="web")
    assert not second.built_index and second.cache_key == first.cache_key
    assert isinstance(second.doc_idx, np.memmap)
    fresh = build_sample_indices(indexed.sequence_lengths, (0, 100), 32, 300, 5)
    for cached, built in zip((second.doc_idx, second.sample_idx, second.shuffle_idx), fresh):
        assert cached.dtype == built.dtype
        np.testing.assert_array_equal(cached, built)
    # Any change of configuration is a different key.
    keys = {first.cache_key}
    for kwargs in [dict(seq_length=31), dict(num_samples=301), dict(seed=6), dict(document_range=(1, 100))]:
        config = dict(seq_length=32, num_samples=300, seed=5, cache_dir=cache) | kwargs
        keys.add(GPTSampleDataset(indexed, **config).cache_key)
    assert len(keys) == 5
    # None means one epoch and shares the cache with the explicit count.
    one_epoch = GPTSampleDataset(indexed, seq_length=32, seed=5, cache_dir=cache)
    explicit = GPTSampleDataset(indexed, seq_length=32, num_samples=len(one_epoch), seed=5, cache_dir=cache)
    assert not explicit.built_index and explicit.cache_key == one_epoch.cache_key


def test_incomplete_cache_is_rebuilt(tmp_path):
    indexed = write_dataset(tmp_path / "data", random_lengths(30, 1))
    cache = str(tmp_path / "cache")
    first = GPTSampleDataset(indexed, seq_length=8, num_samples=50, seed=0, cache_dir=cache)
    os.remove(first.cache_files["shuffle_idx"])
    again = GPTSampleDataset(indexed, seq_length=8, num_samples=50, seed=0, cache_dir=cache)
    assert again.built_index
    os.remove(again.cache_files["description"])  # a build that died before its description
    third = GPTSampleDataset(indexed, seq_length=8, num_samples=50, seed=0, cache_dir=cache)
    assert third.built_index
    check_against_reference(third, indexed)


def test_dataset_rewritten_in_place_gets_new_indices(tmp_path):
    prefix = tmp_path / "data"
    cache = str(tmp_path / "cache")
    old = write_dataset(prefix, [10, 20, 30, 40], seed=1)
    old_ds = GPTSampleDataset(old, seq_length=8, num_samples=20, seed=0, cache_dir=cache)
    old_stat = os.stat(str(prefix) + ".idx"), os.stat(str(prefix) + ".bin")
    # Same name, same number of documents and tokens (both files keep their sizes), other lengths and
    # tokens; the mtimes are even set back, so only the .idx content tells the datasets apart.
    new = write_dataset(prefix, [40, 30, 20, 10], seed=2)
    for path, stat in zip((str(prefix) + ".idx", str(prefix) + ".bin"), old_stat):
        assert os.path.getsize(path) == stat.st_size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    new_ds = GPTSampleDataset(new, seq_length=8, num_samples=20, seed=0, cache_dir=cache)
    assert new_ds.built_index and new_ds.cache_key != old_ds.cache_key
    check_against_reference(new_ds, new)
    # A rewrite with identical bytes but a new mtime is also a new key (cheap to rebuild, never stale).
    write_dataset(prefix, [40, 30, 20, 10], seed=2)
    os.utime(str(prefix) + ".bin", ns=(0, old_stat[1].st_mtime_ns + 10**9))
    newest = GPTSampleDataset(IndexedDataset(str(prefix)), seq_length=8, num_samples=20, seed=0, cache_dir=cache)
    assert newest.built_index and newest.cache_key != new_ds.cache_key


def _build_in_child(prefix, cache, start_barrier, results, barrier=None, is_builder=True):
    start_barrier.wait()
    kwargs = {} if barrier is None else dict(barrier=barrier.wait, is_builder=is_builder)
    ds = GPTSampleDataset(IndexedDataset(prefix), seq_length=16, num_samples=500, seed=9, cache_dir=cache, **kwargs)
    results.put((os.getpid(), ds.built_index, _digest(ds)))


def _slow_build(*args, **kwargs):
    time.sleep(0.5)  # keeps the lock held long enough for the other process to queue on it
    return build_sample_indices(*args, **kwargs)


def _run_children(tmp_path, monkeypatch, barrier_mode):
    prefix = str(tmp_path / "data")
    write_dataset(prefix, random_lengths(200, 3))
    cache = str(tmp_path / "cache")
    monkeypatch.setattr(gpt_dataset, "build_sample_indices", _slow_build)  # inherited by the forked children
    context = multiprocessing.get_context("fork")
    start_barrier, results = context.Barrier(2), context.Queue()
    rank_barrier = context.Barrier(2) if barrier_mode else None
    children = [
        context.Process(target=_build_in_child,
                        args=(prefix, cache, start_barrier, results, rank_barrier, rank == 0))
        for rank in range(2)
    ]
    for child in children:
        child.start()
    outcome = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    return prefix, cache, {pid: (built, digest) for pid, built, digest in outcome}, children


@pytest.mark.parametrize("barrier_mode", [False, True], ids=["file-lock", "barrier"])
def test_processes_started_together_build_once(tmp_path, monkeypatch, barrier_mode):
    prefix, cache, outcome, children = _run_children(tmp_path, monkeypatch, barrier_mode)
    assert sorted(built for built, _ in outcome.values()) == [False, True]
    assert len({digest for _, digest in outcome.values()}) == 1
    if barrier_mode:
        assert outcome[children[0].pid][0]  # the designated builder built
    monkeypatch.undo()
    fresh = GPTSampleDataset(IndexedDataset(prefix), seq_length=16, num_samples=500, seed=9, cache_dir=cache)
    assert not fresh.built_index and _digest(fresh) == next(iter(outcome.values()))[1]


def test_barrier_protocol_in_one_process(tmp_path):
    indexed = write_dataset(tmp_path / "data", random_lengths(40, 4))
    cache = str(tmp_path / "cache")
    calls = []
    config = dict(seq_length=8, num_samples=60, seed=1, cache_dir=cache)
    with pytest.raises(RuntimeError, match="missing from .*cache"):
        GPTSampleDataset(indexed, barrier=lambda: calls.append("waiter"), is_builder=False, **config)
    builder = GPTSampleDataset(indexed, barrier=lambda: calls.append("builder"), is_builder=True, **config)
    waiter = GPTSampleDataset(indexed, barrier=lambda: calls.append("waiter"), is_builder=False, **config)
    assert calls == ["waiter", "builder", "waiter"]
    assert builder.built_index and not waiter.built_index and _digest(builder) == _digest(waiter)

    def failing_build(*args, **kwargs):
        raise MemoryError("boom")

    original = gpt_dataset.build_sample_indices
    gpt_dataset.build_sample_indices = failing_build
    try:
        with pytest.raises(MemoryError):
            GPTSampleDataset(indexed, barrier=lambda: calls.append("failed builder"), is_builder=True,
                             **dict(config, seed=2))
    finally:
        gpt_dataset.build_sample_indices = original
    assert calls[-1] == "failed builder"  # the others are released, not left hanging


def test_pickling_remaps_the_cache(tmp_path):
    indexed = write_dataset(tmp_path / "data", random_lengths(30, 5))
    ds = GPTSampleDataset(indexed, seq_length=8, num_samples=40, seed=0, cache_dir=str(tmp_path / "cache"))
    payload = pickle.dumps(ds)
    assert len(payload) < 4096  # paths, not arrays
    clone = pickle.loads(payload)
    assert isinstance(clone.doc_idx, np.memmap)
    for i in range(len(ds)):
        np.testing.assert_array_equal(clone[i], ds[i])


def test_default_cache_dir_next_to_the_data(tmp_path):
    indexed = write_dataset(tmp_path / "data", random_lengths(30, 6))
    ds = GPTSampleDataset(indexed, seq_length=8, num_samples=10, seed=0)
    assert ds.cache_dir == str(tmp_path / "index-cache")
    assert os.path.exists(ds.cache_files["description"])


def test_sample_index_matches_megatron_core(tmp_path):
    pytest.importorskip("torch")
    helpers = pytest.importorskip("megatron.core.datasets.helpers")
    for seed, (num_docs, seq_length, num_samples) in enumerate([(50, 16, 300), (40, 100, 30), (7, 3, 200)]):
        lengths = random_lengths(num_docs, seed)
        indexed = write_dataset(tmp_path / f"data{seed}", lengths, seed=seed)
        ds = GPTSampleDataset(indexed, seq_length=seq_length, num_samples=num_samples, seed=seed,
                              cache_dir=str(tmp_path / "cache"))
        # Megatron's C++ walk over our document order gives the same boundaries (same offset convention).
        expected = helpers.build_sample_idx(
            np.asarray(indexed.sequence_lengths, np.int32), np.asarray(ds.doc_idx, np.int32), seq_length,
            ds.num_epochs, ds.tokens_per_epoch,
        )
        np.testing.assert_array_equal(ds.sample_idx, expected[: num_samples + 1])
