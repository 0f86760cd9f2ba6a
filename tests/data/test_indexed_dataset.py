import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

from megadoremi.data import indexed_dataset as idx_mod
from megadoremi.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    best_dtype,
    data_file_path,
    index_file_path,
)
from megadoremi.utils.cli import UserError


def random_documents(seed=0, num=200, max_len=60, high=60000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, rng.integers(0, max_len)) for _ in range(num)]


def write_dataset(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)
    return prefix


def megatron_indexed():
    pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    return module


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8, np.int64])
def test_round_trip(tmp_path, dtype):
    high = 250 if dtype == np.uint8 else 60000
    docs = random_documents(high=high)
    prefix = write_dataset(str(tmp_path / "ds"), docs, dtype)
    ds = IndexedDataset(prefix, verify=True)
    assert len(ds) == len(docs) == ds.num_documents
    assert ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
    np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(ds[-1], docs[-1])
    long_doc = max(range(len(docs)), key=lambda i: len(docs[i]))
    np.testing.assert_array_equal(ds.get(long_doc, 3, 5), docs[long_doc][3:8])
    assert [len(x) for x in ds[2:5]] == [len(d) for d in docs[2:5]]
    with pytest.raises(IndexError):
        ds[len(docs)]
    with pytest.raises(IndexError):
        ds.get(long_doc, 2, len(docs[long_doc]))


def test_multi_sequence_documents_and_add_sequences(tmp_path):
    prefix = str(tmp_path / "multi")
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        writer.add_document(np.arange(10), sequence_lengths=[3, 7])
        writer.add_sequences(np.arange(6), lengths=[1, 2, 3], document_ends=[2, 3])
        writer.add_documents(np.arange(5), lengths=[5])
    ds = IndexedDataset(prefix, verify=True)
    assert len(ds) == 6
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 4, 5, 6])
    np.testing.assert_array_equal(ds[1], np.arange(3, 10))


def test_spilling_writer_bounded_memory(tmp_path, monkeypatch):
    # Force the lengths / document arrays through the on-disk spill path.
    monkeypatch.setattr(idx_mod, "_SPILL_ENTRIES", 7)
    docs = random_documents(num=100)
    prefix = write_dataset(str(tmp_path / "spill"), docs)
    reference = write_dataset(str(tmp_path / "ref"), docs)
    monkeypatch.undo()
    for path in (data_file_path, index_file_path):
        assert open(path(prefix), "rb").read() == open(path(reference), "rb").read()
    assert sorted(os.listdir(tmp_path)) == ["ref.bin", "ref.idx", "spill.bin", "spill.idx"]


def test_empty_dataset(tmp_path):
    prefix = write_dataset(str(tmp_path / "empty"), [])
    ds = IndexedDataset(prefix, verify=True)
    assert len(ds) == 0 and ds.num_tokens == 0


def test_writer_abort_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "aborted")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix) as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_rejects_tokens_that_do_not_fit(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as writer:
        with pytest.raises(IndexedDatasetError, match="70000"):
            writer.add_document([1, 70000])
        writer.add_document([1])


def test_best_dtype():
    assert best_dtype(32000) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(256000) == np.int32


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_ours(tmp_path, dtype):
    mcore = megatron_indexed()
    docs = random_documents(seed=1)
    prefix = write_dataset(str(tmp_path / "ours"), docs, dtype)
    theirs = mcore.IndexedDataset(prefix)
    assert len(theirs) == len(docs)
    np.testing.assert_array_equal(theirs.document_indices, np.arange(len(docs) + 1))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], doc)
        assert theirs[i].dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_we_read_megatron_and_bytes_match(tmp_path, dtype):
    import torch

    mcore = megatron_indexed()
    docs = random_documents(seed=2)
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    ours = IndexedDataset(str(tmp_path / "theirs"), verify=True)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ours[i], doc)
    write_dataset(str(tmp_path / "ours"), docs, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()


def test_merge_extends_document_index_and_megatron_accepts_it(tmp_path):
    mcore = megatron_indexed()
    parts = [random_documents(seed=s, num=30) for s in range(3)]
    prefixes = [write_dataset(str(tmp_path / f"part{i}"), docs) for i, docs in enumerate(parts)]
    merged = str(tmp_path / "merged")
    with IndexedDatasetWriter(merged, np.uint16) as writer:
        for prefix in prefixes:
            writer.add_index(prefix)
    all_docs = [doc for docs in parts for doc in docs]
    reference = write_dataset(str(tmp_path / "reference"), all_docs)
    for path in (data_file_path, index_file_path):
        assert open(path(merged), "rb").read() == open(path(reference), "rb").read()
    theirs = mcore.IndexedDataset(merged)
    np.testing.assert_array_equal(theirs.document_indices, np.arange(len(all_docs) + 1))
    np.testing.assert_array_equal(theirs[45], all_docs[45])


def test_merge_refuses_dtype_mismatch(tmp_path):
    a = write_dataset(str(tmp_path / "a"), [[1, 2]], np.uint16)
    with IndexedDatasetWriter(str(tmp_path / "b"), np.int32) as writer:
        with pytest.raises(IndexedDatasetError, match="dtype"):
            writer.add_index(a)


# --- malformed files: each gives a clear error naming the file ------------------------------------------


@pytest.fixture
def good_prefix(tmp_path):
    return write_dataset(str(tmp_path / "good"), random_documents(seed=3, num=20))


def _patch_idx(prefix, offset, data):
    path = index_file_path(prefix)
    raw = bytearray(open(path, "rb").read())
    raw[offset:offset + len(data)] = data
    open(path, "wb").write(bytes(raw))
    return path


def test_missing_files(tmp_path, good_prefix):
    with pytest.raises(IndexedDatasetError, match="nothere.bin") as error:
        IndexedDataset(str(tmp_path / "nothere"))
    assert isinstance(error.value, UserError)  # a command reports it in one line and exits 2
    os.remove(index_file_path(good_prefix))
    with pytest.raises(IndexedDatasetError, match="good.idx.*not found"):
        IndexedDataset(good_prefix)


def test_wrong_magic(good_prefix):
    path = _patch_idx(good_prefix, 0, b"NOTANIDX\x00")
    with pytest.raises(IndexedDatasetError, match=f"{path}.*not a Megatron index"):
        IndexedDataset(good_prefix)


def test_tntidx_refused(good_prefix):
    _patch_idx(good_prefix, 0, b"TNTIDX\x00\x00")
    with pytest.raises(IndexedDatasetError, match="TNTIDX"):
        IndexedDataset(good_prefix)


def test_unsupported_version(good_prefix):
    _patch_idx(good_prefix, 9, struct.pack("<Q", 2))
    with pytest.raises(IndexedDatasetError, match="unsupported index version 2"):
        IndexedDataset(good_prefix)


@pytest.mark.parametrize("code", [6, 7, 9, 0])
def test_unsupported_dtype(good_prefix, code):
    _patch_idx(good_prefix, 17, bytes([code]))
    with pytest.raises(IndexedDatasetError, match=f"unsupported dtype code {code}"):
        IndexedDataset(good_prefix)


def test_truncated_idx(good_prefix):
    path = index_file_path(good_prefix)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-5])
    with pytest.raises(IndexedDatasetError, match="good.idx: truncated"):
        IndexedDataset(good_prefix)
    open(path, "wb").write(raw[:20])
    with pytest.raises(IndexedDatasetError, match="truncated header"):
        IndexedDataset(good_prefix)


def test_trailing_bytes_in_idx(good_prefix):
    path = index_file_path(good_prefix)
    with open(path, "ab") as handle:
        handle.write(b"\x00" * 8)
    with pytest.raises(IndexedDatasetError, match="trailing bytes"):
        IndexedDataset(good_prefix)


def test_truncated_bin(good_prefix):
    path = data_file_path(good_prefix)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-2])
    with pytest.raises(IndexedDatasetError, match="good.bin: size .* does not match"):
        IndexedDataset(good_prefix)


def test_fairseq_2019_index_refused(tmp_path):
    # The 2019 format: same magic, no document count and no document index.
    prefix = str(tmp_path / "old")
    lengths = np.array([3, 4], np.int32)
    with open(prefix + ".idx", "wb") as handle:
        handle.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([8]) + struct.pack("<Q", 2))
        handle.write(lengths.tobytes() + np.array([0, 6], np.int64).tobytes())
    open(prefix + ".bin", "wb").write(np.arange(7, dtype=np.uint16).tobytes())
    with pytest.raises(IndexedDatasetError, match="without a document index"):
        IndexedDataset(prefix)


def test_lengths_that_do_not_add_up(good_prefix):
    ds = IndexedDataset(good_prefix)
    # Swap two pointers: header checks pass (first pointer 0, last + length = size) only if we keep the ends.
    pointers = np.array(ds.sequence_pointers)
    pointers[5], pointers[6] = pointers[6], pointers[5]
    del ds
    _patch_idx(good_prefix, 34 + 4 * 20, pointers.tobytes())
    IndexedDataset(good_prefix)  # cheap checks pass
    with pytest.raises(IndexedDatasetError, match="pointer of sequence 5"):
        IndexedDataset(good_prefix, verify=True)


def test_document_index_must_end_at_num_sequences(good_prefix):
    ds = IndexedDataset(good_prefix)
    offset = 34 + 12 * len(ds) + 8 * ds.num_documents
    del ds
    _patch_idx(good_prefix, offset, struct.pack("<q", 19))
    with pytest.raises(IndexedDatasetError, match="document index must run from 0 to 20"):
        IndexedDataset(good_prefix)


def test_pickle_reopens(good_prefix):
    import pickle

    ds = pickle.loads(pickle.dumps(IndexedDataset(good_prefix)))
    assert len(ds) == 20 and ds[3].size == IndexedDataset(good_prefix)[3].size


def test_merge_and_inspect_tools(tmp_path, repo_root):
    parts = [write_dataset(str(tmp_path / f"p{i}"), random_documents(seed=10 + i, num=10)) for i in range(2)]
    out = str(tmp_path / "merged")
    subprocess.run(
        [sys.executable, "tools/merge_datasets.py", "--input", *parts, "--output-prefix", out],
        cwd=repo_root, check=True, capture_output=True, text=True,
    )
    assert len(IndexedDataset(out)) == 20
    result = subprocess.run(
        [sys.executable, "tools/inspect_dataset.py", out, "--sample", "3", "--json"],
        cwd=repo_root, check=True, capture_output=True, text=True,
    )
    import json

    report = json.loads(result.stdout)
    assert report["num_documents"] == 20 and report["num_sequences"] == 20
    assert report["num_tokens"] == IndexedDataset(out).num_tokens
    assert report["samples"]["3"]["tokens"] == IndexedDataset(out)[3].tolist()
    bad = subprocess.run(
        [sys.executable, "tools/merge_datasets.py", "--input", parts[0], str(tmp_path / "missing"),
         "--output-prefix", str(tmp_path / "m2")],
        cwd=repo_root, capture_output=True, text=True,
    )
    assert bad.returncode != 0 and "missing.bin" in bad.stderr
    assert not os.path.exists(str(tmp_path / "m2.idx"))
