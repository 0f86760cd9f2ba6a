"""Domain weights, the blended dataset (stable domain ids, exact greedy mixture, shortfalls) and the builders."""

import contextlib
import json
import logging
import math

import numpy as np
import pytest

from megadoremi.data.blending import (
    BlendedDataset,
    build_blended_dataset,
    build_domain_eval_datasets,
    domain_seed,
    load_domain_weights,
    megatron_samples_per_domain,
)
from megadoremi.data.gpt_dataset import GPTSampleDataset, samples_per_epoch, split_document_ranges
from megadoremi.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from megadoremi.utils.cli import UserError

DOMAINS = ["web", "code", "books"]


def write_weights(tmp_path, content, name="weights.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def naive_greedy(weights, size):
    """The greedy blend exactly as MEGATRON_DATA.md states it (max(i, 1), ties to the lowest index)."""
    counts = np.zeros(len(weights), np.int64)
    dataset_index, sample_index = [], []
    for i in range(size):
        errors = [weights[k] * max(i, 1) - counts[k] for k in range(len(weights))]
        k = int(np.argmax(errors))
        dataset_index.append(k)
        sample_index.append(int(counts[k]))
        counts[k] += 1
    return np.array(dataset_index), np.array(sample_index)


@contextlib.contextmanager
def captured_log(level=logging.INFO):
    """Records of the megadoremi logger (it does not propagate to the root logger pytest watches)."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level)
    logger = logging.getLogger("megadoremi")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------------------------------ domain weights


def test_load_domain_weights_from_file_mapping_and_list(tmp_path):
    path = write_weights(tmp_path, {"books": 1.0, "web": 2.0, "code": 1})  # any order, ints allowed
    weights = load_domain_weights(path, DOMAINS)
    assert weights.dtype == np.float64 and weights.tolist() == [0.5, 0.25, 0.25]
    assert load_domain_weights({"web": 0.2, "code": 0.3, "books": 0.5}, DOMAINS).tolist() == pytest.approx(
        [0.2, 0.3, 0.5])
    assert load_domain_weights([1, 1, 2], DOMAINS).tolist() == [0.25, 0.25, 0.5]
    assert load_domain_weights(np.array([0.0, 3.0, 1.0]), DOMAINS).tolist() == [0.0, 0.75, 0.25]
    nested = write_weights(tmp_path, {"train_domain_weights": {"web": 1, "code": 1, "books": 2}}, "doremi.json")
    assert load_domain_weights(nested, DOMAINS).tolist() == [0.25, 0.25, 0.5]
    assert math.isclose(load_domain_weights([0.1] * 3, DOMAINS).sum(), 1.0)


@pytest.mark.parametrize(
    "content,fragments",
    [
        ({"web": 1, "code": 1, "books": 1, "news": 1}, ["unknown", "'news'"]),
        ({"web": 1, "code": 1}, ["no weight", "'books'"]),
        ({"web": 1, "code": -0.25, "books": 1}, ["'code'", "-0.25", "negative"]),
        ('{"web": 1, "code": NaN, "books": 1}', ["'code'", "nan", "not finite"]),
        ('{"web": Infinity, "code": 1, "books": 1}', ["'web'", "inf", "not finite"]),
        ({"web": 0, "code": 0.0, "books": 0}, ["all weights are zero"]),
        ({"web": "0.5", "code": 1, "books": 1}, ["'web'", "'0.5'", "not a number"]),
        ({"web": True, "code": 1, "books": 1}, ["'web'", "True", "not a number"]),
        ({"web": None, "code": 1, "books": [1]}, ["'web'", "None", "'books'", "[1]", "not a number"]),
        ('{"web": 1, "code": 1, "books": ', ["not valid JSON"]),
        ("[0.2, 0.3, 0.5]", ["expected a JSON object"]),
        ('{"web": 1, "code": 1, "books": 1, "web": 2}', ["more than once", "'web'"]),
    ],
)
def test_load_domain_weights_file_errors_name_file_domain_and_value(tmp_path, content, fragments):
    path = write_weights(tmp_path, content)
    with pytest.raises(ValueError) as error:
        load_domain_weights(path, DOMAINS)
    assert isinstance(error.value, UserError)  # a command reports it in one line and exits 2
    message = str(error.value)
    assert path in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_load_domain_weights_other_errors(tmp_path):
    missing = str(tmp_path / "absent.json")
    with pytest.raises(UserError, match=f"{missing}.*cannot read"):
        load_domain_weights(missing, DOMAINS)
    with pytest.raises(ValueError, match="2 weights given for 3 domains"):
        load_domain_weights([1, 2], DOMAINS)
    with pytest.raises(ValueError, match="'code'.*-1.*negative"):
        load_domain_weights([1, -1, 1], DOMAINS)
    with pytest.raises(ValueError, match="'books'.*nan"):
        load_domain_weights({"web": 1, "code": 1, "books": float("nan")}, DOMAINS)
    with pytest.raises(ValueError, match="all weights are zero"):
        load_domain_weights([0, 0, 0], DOMAINS)
    with pytest.raises(ValueError, match="unique"):
        load_domain_weights([1, 1], ["web", "web"])


# --------------------------------------------------------------------------------------------- the blend


class FakeDomain:
    """A map-style dataset whose sample j of domain d is [d, j]."""

    def __init__(self, domain_id, num_samples):
        self.domain_id, self.num_samples = domain_id, num_samples

    def __len__(self):
        return self.num_samples

    def __getitem__(self, j):
        assert 0 <= j < self.num_samples
        return np.array([self.domain_id, j], np.int64)


def test_blend_follows_the_greedy_order_exactly():
    rng = np.random.default_rng(0)
    for trial in range(6):
        num_domains = int(rng.integers(1, 7))
        raw = rng.random(num_domains) + 0.01
        size = int(rng.integers(0, 400))
        weights = raw / raw.sum()
        datasets = {f"d{k}": FakeDomain(k, size + 1) for k in range(num_domains)}
        blend = BlendedDataset(datasets, raw, size)
        expected_index, expected_sample = naive_greedy(weights, size)
        np.testing.assert_array_equal(blend.dataset_index, expected_index.reshape(size))
        np.testing.assert_array_equal(blend.dataset_sample_index, expected_sample.reshape(size))
        # The empirical mixture is the greedy counts, within two samples of size * w (the greedy's bound is
        # a little over one sample).
        counts = np.bincount(blend.domain_index, minlength=num_domains)
        assert [blend.samples_per_domain[f"d{k}"] for k in range(num_domains)] == counts.tolist()
        assert np.all(np.abs(counts - weights * size) < 2), (counts, weights * size)
        for i in range(0, size, 7):
            sample = blend[i]
            np.testing.assert_array_equal(sample["tokens"], [sample["domain_id"], expected_sample[i]])


def test_blend_matches_megatron_core_helpers():
    pytest.importorskip("torch")
    helpers = pytest.importorskip("megatron.core.datasets.helpers_cpp")
    raw = np.array([0.37, 0.21, 0.05, 0.55])
    size = 1000
    blend = BlendedDataset([FakeDomain(k, size) for k in range(4)], raw, size, domain_names=list("abcd"))
    expected_index, expected_sample = megatron_blending_indices(helpers, raw / raw.sum(), size)
    np.testing.assert_array_equal(blend.dataset_index, expected_index)
    np.testing.assert_array_equal(blend.dataset_sample_index, expected_sample)


def megatron_blending_indices(helpers, weights, size):
    dataset_index = np.zeros(size, np.int16)
    dataset_sample_index = np.zeros(size, np.int64)
    helpers.build_blending_indices(dataset_index, dataset_sample_index, weights, len(weights), size, False)
    return dataset_index, dataset_sample_index


def test_zero_weight_domains_are_dropped_and_ids_stay_stable():
    datasets = {"web": FakeDomain(0, 100), "code": None, "books": FakeDomain(2, 100), "math": FakeDomain(3, 0)}
    with captured_log() as records:
        blend = BlendedDataset(datasets, {"web": 3, "code": 0, "books": 1, "math": 0}, 80, name="train")
    assert blend.domain_names == ["web", "code", "books", "math"]
    assert blend.kept_domain_ids.tolist() == [0, 2]
    assert set(np.unique(blend.domain_index).tolist()) == {0, 2}
    assert blend.samples_per_domain == {"web": 60, "code": 0, "books": 20, "math": 0}
    for i in range(len(blend)):
        sample = blend[i]
        assert sample["tokens"][0] == sample["domain_id"]  # the sample really comes from that domain
    # Same ids as the blend without the dropped domains would have had in the full list.
    np.testing.assert_array_equal(blend.domain_index, np.array([0, 2])[naive_greedy([0.75, 0.25], 80)[0]])
    assert any("dropping zero-weight" in r.getMessage() and "code" in r.getMessage() for r in records)
    assert len(blend) == 80
    np.testing.assert_array_equal(blend[-1]["tokens"], blend[79]["tokens"])
    with pytest.raises(IndexError):
        blend[80]
    with pytest.raises(ValueError, match="'web'.*no dataset"):
        BlendedDataset({"web": None, "code": FakeDomain(1, 10)}, [1, 1], 4)


def test_shortfall_names_the_domain_and_the_numbers():
    datasets = [("web", FakeDomain(0, 1000)), ("code", FakeDomain(1, 20)), ("books", FakeDomain(2, 5))]
    with pytest.raises(ValueError) as error:
        BlendedDataset(datasets, [0.5, 0.3, 0.2], 100, name="train")
    message = str(error.value)
    assert "'code' is asked for 30 samples but its dataset has 20 (short by 10)" in message
    assert "'books' is asked for 20 samples but its dataset has 5 (short by 15)" in message
    assert "'web'" not in message
    BlendedDataset(datasets, [0.5, 0.3, 0.2], 25)  # 8 and 5 samples: enough


def test_naming_the_datasets():
    a, b = FakeDomain(0, 10), FakeDomain(1, 10)
    assert BlendedDataset([a, b], [1, 1], 4, domain_names=["x", "y"]).domain_names == ["x", "y"]
    with pytest.raises(ValueError, match="name the datasets"):
        BlendedDataset([a, b], [1, 1], 4)
    with pytest.raises(ValueError, match="unique"):
        BlendedDataset([("x", a), ("x", b)], [1, 1], 4)


# ------------------------------------------------------------------------------------------------ builders


@pytest.fixture
def corpus(tmp_path):
    """Three domains: two large, one small enough to need several epochs."""
    rng = np.random.default_rng(1)
    prefixes = {}
    for name, num_docs, max_length in [("web", 300, 100), ("code", 200, 80), ("tiny", 40, 40)]:
        prefix = str(tmp_path / f"{name}_text_document")
        lengths = rng.integers(0, max_length, num_docs)
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_documents(rng.integers(0, 60000, int(lengths.sum())), lengths)
        prefixes[name] = prefix
    return prefixes


def test_build_blended_dataset(tmp_path, corpus):
    weights_path = write_weights(tmp_path, {"web": 0.5, "code": 0.2, "tiny": 0.3})
    num_samples, seq_length = 301, 32
    with captured_log(logging.WARNING) as records:
        blend = build_blended_dataset(corpus, weights_path, num_samples, seq_length=seq_length, seed=1234,
                                      cache_dir=str(tmp_path / "cache"))
    targets, buffered = megatron_samples_per_domain(np.array([0.5, 0.2, 0.3]), num_samples)
    assert targets == [151, 61, 91] and buffered == [152, 62, 92]
    assert len(blend) == sum(targets) and blend.requested_num_samples == num_samples
    assert blend.samples_per_domain == dict(zip(["web", "code", "tiny"], targets))
    seeds = set()
    for d, (name, dataset) in enumerate(zip(blend.domain_names, blend.datasets)):
        indexed = IndexedDataset(corpus[name])
        assert isinstance(dataset, GPTSampleDataset) and len(dataset) == buffered[d]
        assert dataset.document_range == split_document_ranges(len(indexed), "969,30,1")[0]
        assert dataset.seed == domain_seed(1234, d)
        seeds.add(dataset.seed)
    assert len(seeds) == 3
    for i in range(len(blend)):
        sample = blend[i]
        source = blend.datasets[int(blend.dataset_index[i])]
        np.testing.assert_array_equal(sample["tokens"], source[int(blend.dataset_sample_index[i])])
        assert sample["tokens"].shape == (seq_length + 1,)
    # Oversampling is reported, not an error: only the tiny domain repeats documents.
    tiny = blend.datasets[2]
    assert set(blend.oversampling) == {"tiny"} and tiny.num_epochs > 1
    assert blend.oversampling["tiny"] == pytest.approx((92 * seq_length + 1) / tiny.tokens_per_epoch)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("'tiny' is oversampled" in m and str(tiny.tokens_per_epoch) in m
               and str(92 * seq_length + 1) in m and f"{blend.oversampling['tiny']:.2f} epochs" in m
               for m in warnings), warnings
    # Rebuilding reuses every cached index and gives the same blend.
    again = build_blended_dataset(corpus, {"web": 0.5, "code": 0.2, "tiny": 0.3}, num_samples,
                                  seq_length=seq_length, seed=1234, cache_dir=str(tmp_path / "cache"))
    assert not any(dataset.built_index for dataset in again.datasets)
    for i in range(0, len(blend), 17):
        np.testing.assert_array_equal(again[i]["tokens"], blend[i]["tokens"])


def test_build_blended_dataset_matches_megatron_core(tmp_path, corpus):
    pytest.importorskip("torch")
    helpers = pytest.importorskip("megatron.core.datasets.helpers_cpp")
    raw = [0.37, 0.21, 0.55]
    blend = build_blended_dataset(corpus, raw, 1234, seq_length=8, seed=0, cache_dir=str(tmp_path / "cache"))
    # Megatron's builder: w = normalize(raw) sizes the datasets; its BlendedDataset normalizes w once more.
    w = np.array(raw) / np.sum(raw)
    targets, buffered = megatron_samples_per_domain(w, 1234)
    assert len(blend) == sum(targets) and [len(d) for d in blend.datasets] == buffered
    expected_index, expected_sample = megatron_blending_indices(helpers, w / w.sum(), sum(targets))
    np.testing.assert_array_equal(blend.dataset_index, expected_index)
    np.testing.assert_array_equal(blend.dataset_sample_index, expected_sample)


def test_build_blended_dataset_with_a_zero_weight_domain(tmp_path, corpus):
    blend = build_blended_dataset(corpus, [0.6, 0.0, 0.4], 100, seq_length=16, seed=0,
                                  cache_dir=str(tmp_path / "cache"))
    assert blend.domain_names == ["web", "code", "tiny"]
    assert [dataset.name for dataset in blend.datasets] == ["web", "tiny"]
    assert set(np.unique(blend.domain_index).tolist()) == {0, 2}
    assert blend.samples_per_domain == {"web": 60, "code": 0, "tiny": 40}
    for i in range(len(blend)):
        assert blend[i]["domain_id"] in (0, 2)


def test_build_blended_dataset_validation_split(tmp_path, corpus):
    blend = build_blended_dataset(corpus, [1, 1, 1], 30, seq_length=8, seed=0, split="90,10,0", split_index=1,
                                  cache_dir=str(tmp_path / "cache"))
    for name, dataset in zip(blend.domain_names, blend.datasets):
        indexed = IndexedDataset(corpus[name])
        assert dataset.document_range == split_document_ranges(len(indexed), "90,10,0")[1]


def test_build_domain_eval_datasets(tmp_path, corpus):
    cache = str(tmp_path / "cache")
    eval_sets = build_domain_eval_datasets(corpus, seq_length=16, seed=3, split="80,20,0", cache_dir=cache)
    assert list(eval_sets) == ["web", "code", "tiny"]
    for name, dataset in eval_sets.items():
        indexed = IndexedDataset(corpus[name])
        start, end = split_document_ranges(len(indexed), "80,20,0")[1]
        assert dataset.document_range == (start, end) and dataset.num_epochs == 1
        tokens = int(indexed.sequence_lengths[start:end].sum())
        assert len(dataset) == samples_per_epoch(tokens, 16) > 0
    capped = build_domain_eval_datasets(corpus, seq_length=16, seed=3, split="80,20,0", cache_dir=cache,
                                        max_samples_per_domain=5)
    assert {name: len(dataset) for name, dataset in capped.items()} == {"web": 5, "code": 5, "tiny": 5}
    np.testing.assert_array_equal(capped["web"].doc_idx, eval_sets["web"].doc_idx)  # the same documents
    with pytest.raises(ValueError, match=f"{corpus['web']}.*no tokens"):
        build_domain_eval_datasets(corpus, seq_length=16, seed=3, split="100,0,0", cache_dir=cache)
