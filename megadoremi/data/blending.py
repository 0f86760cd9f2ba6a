"""Static blends of per-domain GPT datasets (e.g. with the final DoReMi weights) and per-domain eval sets.

``build_blended_dataset`` follows Megatron: each domain's ``GPTSampleDataset`` is asked for
``ceil(ceil(N * w_d) * 1.005)`` samples, the blend has ``sum_d ceil(N * w_d)`` samples (at least N) and its
order is Megatron's greedy ``build_blending_indices``. Unlike Megatron, zero-weight domains are allowed (they
are dropped and keep their domain id), and a domain that must be repeated (more than one epoch) is reported,
not hidden. Weights that change every step need the sampler in ``megadoremi.data.sampler`` instead: rebuilding
a blend mid-run repeats or skips data.
"""

import hashlib
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from megadoremi.data.blending_indices import build_blending_indices, normalize_weights
from megadoremi.data.gpt_dataset import GPTSampleDataset, samples_per_epoch, split_document_ranges
from megadoremi.data.indexed_dataset import IndexedDataset
from megadoremi.utils.cli import UserError
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

MEGATRON_SAMPLE_SURPLUS = 0.005  # each domain builds 0.5% more samples than the blend should need
_NESTED_WEIGHT_KEYS = ("domain_weights", "train_domain_weights")  # also read official DoReMi config files


# --------------------------------------------------------------------------------------------- weights


class WeightsError(UserError, ValueError):
    """Domain weights (a file, mapping or list) that cannot be used; the message names the file, domain and value."""


def _reject_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"domain(s) listed more than once: {', '.join(map(repr, duplicates))}")
    return dict(pairs)


def _read_weights_file(path: str) -> dict:
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError as error:
        raise WeightsError(f"domain weights file {path}: cannot read it ({error.strerror or error})") from None
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as error:
        raise WeightsError(f"domain weights file {path}: not valid JSON ({error})") from None
    except ValueError as error:
        raise WeightsError(f"domain weights file {path}: {error}") from None
    if not isinstance(data, dict):
        raise WeightsError(
            f'domain weights file {path}: expected a JSON object {{"domain name": weight, ...}}, '
            f"got {type(data).__name__}"
        )
    for key in _NESTED_WEIGHT_KEYS:
        if isinstance(data.get(key), dict):
            return data[key]
    return data


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def load_domain_weights(source, domain_names: Sequence[str]) -> np.ndarray:
    """Weights for ``domain_names`` (in that order), normalized float64 summing to 1.

    ``source`` is a path to a JSON file ``{"domain name": weight, ...}`` (as DoReMi writes; an object nested
    under ``"domain_weights"`` or ``"train_domain_weights"`` is also read), a mapping of the same form, or a
    sequence aligned with ``domain_names``. Every domain needs a weight and the source may name no other;
    weights must be finite, non-negative numbers, not all zero. Any violation raises one ``WeightsError``
    naming the source, each offending domain and its value.
    """
    domain_names = [str(name) for name in domain_names]
    if len(set(domain_names)) != len(domain_names):
        duplicates = sorted({name for name in domain_names if domain_names.count(name) > 1})
        raise WeightsError(f"domain names must be unique, got duplicates {duplicates}")
    if not domain_names:
        raise WeightsError("no domains given")

    if isinstance(source, (str, os.PathLike)):
        where = f"domain weights file {os.fspath(source)}"
        by_name = _read_weights_file(os.fspath(source))
    elif isinstance(source, Mapping):
        where, by_name = "domain weights", dict(source)
    else:
        values = list(np.asarray(source, dtype=object).reshape(-1)) if isinstance(source, np.ndarray) else list(source)
        where = "domain weights"
        if len(values) != len(domain_names):
            raise WeightsError(
                f"{where}: {len(values)} weights given for {len(domain_names)} domains {domain_names}"
            )
        by_name = dict(zip(domain_names, values))

    problems = []
    unknown = [str(key) for key in by_name if key not in domain_names]
    if unknown:
        problems.append(f"unknown domain(s) {unknown} (the datasets' domains are {domain_names})")
    missing = [name for name in domain_names if name not in by_name]
    if missing:
        problems.append(f"no weight for domain(s) {missing}")
    weights = np.zeros(len(domain_names), np.float64)
    for i, name in enumerate(domain_names):
        if name not in by_name:
            continue
        value = by_name[name]
        if not _is_number(value):
            problems.append(f"domain {name!r}: weight {value!r} is not a number")
        elif not math.isfinite(float(value)):
            problems.append(f"domain {name!r}: weight {value!r} is not finite")
        elif float(value) < 0:
            problems.append(f"domain {name!r}: weight {value!r} is negative")
        else:
            weights[i] = float(value)
    if not problems and weights.sum() <= 0:
        problems.append(f"all weights are zero ({dict(zip(domain_names, weights.tolist()))})")
    if problems:
        raise WeightsError(f"{where}: " + "; ".join(problems))
    return normalize_weights(weights)


# ------------------------------------------------------------------------------------------------ blend


def _named_datasets(datasets, domain_names) -> tuple[list[str], list]:
    if isinstance(datasets, Mapping):
        if domain_names is not None:
            raise ValueError("pass domain_names only with a list of datasets; a mapping already names them")
        names, values = [str(key) for key in datasets], list(datasets.values())
    else:
        datasets = list(datasets)
        if domain_names is not None:
            names, values = [str(name) for name in domain_names], datasets
            if len(names) != len(values):
                raise ValueError(f"{len(names)} domain names for {len(values)} datasets")
        elif all(isinstance(item, tuple) and len(item) == 2 for item in datasets):
            names, values = [str(name) for name, _ in datasets], [dataset for _, dataset in datasets]
        else:
            raise ValueError("name the datasets: pass a {name: dataset} mapping, (name, dataset) pairs or domain_names")
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique, got {names}")
    return names, values


class BlendedDataset:
    """``size`` samples drawn from several domains in Megatron's greedy order for ``weights``.

    ``blend[i]`` is ``{"tokens": <the domain dataset's sample>, "domain_id": d}`` where ``d`` indexes
    ``domain_names``, the domains as given (zero-weight domains included, so ids stay stable when weights drop
    a domain). Zero-weight domains are dropped before blending and may have ``None`` as dataset.
    ``oversampling`` maps each domain whose dataset repeats documents (needs more than one epoch) to the
    number of epochs its samples need (tokens needed / tokens available).
    """

    def __init__(
        self,
        datasets,
        weights,
        size: int,
        *,
        domain_names: Sequence[str] | None = None,
        name: str = "",
        blending_indices: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.name = name or "blend"
        self.domain_names, all_datasets = _named_datasets(datasets, domain_names)
        self.weights = load_domain_weights(weights, self.domain_names)  # (K,) float64, sum 1
        if int(size) != size or size < 0:
            raise ValueError(f"blend {self.name}: size must be a non-negative integer, got {size!r}")
        self.size = int(size)

        self.kept_domain_ids = np.flatnonzero(self.weights > 0).astype(np.int16)  # (K_kept,)
        dropped = [self.domain_names[d] for d in range(len(self.domain_names)) if self.weights[d] == 0]
        if dropped:
            logger.info("blend %s: dropping zero-weight domain(s) %s", self.name, dropped)
        self.datasets = [all_datasets[d] for d in self.kept_domain_ids]  # aligned with kept_domain_ids
        for d, dataset in zip(self.kept_domain_ids, self.datasets):
            if dataset is None:
                raise ValueError(
                    f"blend {self.name}: domain {self.domain_names[d]!r} has weight {self.weights[d]:.6g} "
                    "but no dataset"
                )

        if blending_indices is None:
            blending_indices = build_blending_indices(self.weights[self.kept_domain_ids], self.size)
        # (size,) position among the kept domains, and the sample of that domain's dataset
        self.dataset_index, self.dataset_sample_index = blending_indices
        if self.dataset_index.shape != (self.size,) or self.dataset_sample_index.shape != (self.size,):
            raise ValueError(f"blend {self.name}: blending indices do not have {self.size} entries")
        self.domain_index = self.kept_domain_ids[self.dataset_index]  # (size,) original domain ids

        counts = np.bincount(self.dataset_index, minlength=len(self.kept_domain_ids))
        self.samples_per_domain = dict.fromkeys(self.domain_names, 0)
        for d, count in zip(self.kept_domain_ids, counts.tolist()):
            self.samples_per_domain[self.domain_names[d]] = count
        self._check_sizes(counts)
        self.oversampling = self._report_oversampling()

    def _check_sizes(self, counts: np.ndarray) -> None:
        shortfalls = []
        for d, dataset, requested in zip(self.kept_domain_ids, self.datasets, counts.tolist()):
            available = len(dataset)
            if requested > available:
                shortfalls.append(
                    f"domain {self.domain_names[d]!r} is asked for {requested} samples but its dataset has "
                    f"{available} (short by {requested - available})"
                )
        if shortfalls:
            raise ValueError(
                f"blend {self.name} of {self.size} samples: " + "; ".join(shortfalls)
                + " (build each domain's dataset with at least that many samples; build_blended_dataset does)"
            )

    def _report_oversampling(self) -> dict[str, float]:
        oversampling = {}
        for d, dataset in zip(self.kept_domain_ids, self.datasets):
            tokens_needed = getattr(dataset, "tokens_needed", None)
            tokens_per_epoch = getattr(dataset, "tokens_per_epoch", None)
            if not tokens_needed or not tokens_per_epoch or tokens_needed <= tokens_per_epoch:
                continue
            name = self.domain_names[d]
            oversampling[name] = tokens_needed / tokens_per_epoch
            logger.warning(
                "blend %s: domain %r is oversampled: %d samples of %d tokens need %d tokens, its documents hold "
                "%d: %.2f epochs (%d passes, documents repeat)",
                self.name, name, len(dataset), getattr(dataset, "seq_length", 0) + 1, tokens_needed,
                tokens_per_epoch, oversampling[name], getattr(dataset, "num_epochs", math.ceil(oversampling[name])),
            )
        return oversampling

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        """``{"tokens": sample, "domain_id": int}``."""
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} out of range for blend {self.name} of {self.size} samples")
        dataset = self.datasets[int(self.dataset_index[index])]
        return {
            "tokens": dataset[int(self.dataset_sample_index[index])],
            "domain_id": int(self.domain_index[index]),
        }

    def __repr__(self) -> str:
        weights = ", ".join(f"{n}={w:.4g}" for n, w in zip(self.domain_names, self.weights))
        return f"BlendedDataset({self.name!r}, size={self.size}, weights={{{weights}}})"


# ---------------------------------------------------------------------------------------------- builders


def domain_seed(seed: int, domain_id: int) -> int:
    """A per-domain seed derived from the run's seed and the domain's index (distinct domains, distinct
    streams; the same for every rank and every run with that seed)."""
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(np.random.SeedSequence([int(seed), int(domain_id)]).generate_state(1)[0])


def megatron_samples_per_domain(weights: np.ndarray, num_samples: int) -> tuple[list[int], list[int]]:
    """Megatron's sizes: ``ceil(N * w_d)`` samples the blend takes from domain d (the blend has their sum)
    and ``ceil(ceil(N * w_d) * 1.005)`` samples domain d's dataset is built with."""
    targets = [int(math.ceil(num_samples * float(w))) for w in weights]
    buffered = [int(math.ceil(target * (1 + MEGATRON_SAMPLE_SURPLUS))) for target in targets]
    return targets, buffered


def domain_document_range(indexed: IndexedDataset, split: str, split_index: int) -> tuple[int, int]:
    """The documents ``[start, end)`` of part ``split_index`` of ``split`` (Megatron's "969,30,1" form)."""
    ranges = split_document_ranges(len(indexed), split)
    if not 0 <= split_index < len(ranges):
        raise ValueError(f"split_index {split_index} out of range for split {split!r} ({len(ranges)} parts)")
    return ranges[split_index]


def natural_weights(domain_prefixes: Mapping[str, str], split: str = "969,30,1", split_index: int = 0
                    ) -> np.ndarray:
    """Each domain's share of the tokens in its ``split_index`` part (the training split by default), (K,)."""
    tokens = []
    for prefix in domain_prefixes.values():
        indexed = IndexedDataset(prefix)
        start, end = domain_document_range(indexed, split, split_index)
        tokens.append(int(indexed.sequence_lengths[start:end].sum(dtype=np.int64)))
    total = sum(tokens)
    if total == 0:
        raise ValueError(f"natural weights: the domains' split {split_index} of {split!r} holds no tokens")
    return np.array(tokens, dtype=np.float64) / total


def build_blended_dataset(
    domain_prefixes: Mapping[str, str],
    weights,
    num_samples: int,
    *,
    seq_length: int,
    seed: int,
    split: str = "969,30,1",
    split_index: int = 0,
    cache_dir: str | None = None,
    name: str = "",
    barrier: Callable[[], None] | None = None,
    is_builder: bool = True,
) -> BlendedDataset:
    """A blend of at least ``num_samples`` samples over the ``split_index`` part of every domain's documents.

    ``weights``: anything ``load_domain_weights`` accepts. Each domain with a positive weight gets a
    ``GPTSampleDataset`` of Megatron's size (``megatron_samples_per_domain``; more only in the rare case
    where the greedy order needs more than the 0.5% surplus, so the blend never runs short) with seed
    ``domain_seed(seed, d)``. ``cache_dir``, ``barrier``, ``is_builder``: see ``GPTSampleDataset``.
    Domains that must repeat documents are in the result's ``oversampling`` (and logged as warnings).
    """
    domain_names = [str(key) for key in domain_prefixes]
    normalized = load_domain_weights(weights, domain_names)
    if int(num_samples) != num_samples or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
    kept = np.flatnonzero(normalized > 0)
    targets, buffered = megatron_samples_per_domain(normalized[kept], int(num_samples))
    size = sum(targets)
    # Megatron normalizes twice: the builder for the sizes, its BlendedDataset again for the order. The
    # BlendedDataset below does the same (normalizing ``normalized``), so these are the indices it would build.
    indices = build_blending_indices(normalize_weights(normalized)[kept], size)
    counts = np.bincount(indices[0], minlength=kept.size).tolist()

    datasets = dict.fromkeys(domain_names)
    for position, d in enumerate(kept.tolist()):
        domain = domain_names[d]
        indexed = IndexedDataset(domain_prefixes[domain])
        datasets[domain] = GPTSampleDataset(
            indexed,
            document_range=domain_document_range(indexed, split, split_index),
            seq_length=seq_length,
            num_samples=max(buffered[position], counts[position]),
            seed=domain_seed(seed, d),
            cache_dir=cache_dir,
            name=domain,
            barrier=barrier,
            is_builder=is_builder,
        )
    blend = BlendedDataset(datasets, normalized, size, name=name or f"split{split_index}", blending_indices=indices)
    blend.requested_num_samples = int(num_samples)
    return blend


def build_domain_eval_datasets(
    domain_prefixes: Mapping[str, str],
    *,
    seq_length: int,
    seed: int,
    split: str = "969,30,1",
    split_index: int = 1,
    cache_dir: str | None = None,
    max_samples_per_domain: int | None = None,
    barrier: Callable[[], None] | None = None,
    is_builder: bool = True,
) -> dict[str, GPTSampleDataset]:
    """One epoch of every domain's ``split_index`` part (the validation split by default), optionally capped
    at ``max_samples_per_domain`` samples, for per-domain validation losses. A domain whose part is too small
    for one sample raises (naming its dataset): change the split rather than lose a domain silently."""
    if max_samples_per_domain is not None and (int(max_samples_per_domain) != max_samples_per_domain
                                               or max_samples_per_domain < 1):
        raise ValueError(f"max_samples_per_domain must be a positive integer, got {max_samples_per_domain!r}")
    eval_datasets = {}
    for d, (domain, prefix) in enumerate(domain_prefixes.items()):
        indexed = IndexedDataset(prefix)
        start, end = domain_document_range(indexed, split, split_index)
        num_samples = None  # one epoch
        if max_samples_per_domain is not None and int(seq_length) == seq_length and seq_length >= 1:
            tokens = int(indexed.sequence_lengths[start:end].sum(dtype=np.int64))
            # 0 (too few tokens) stays None so that the dataset raises its error naming the dataset
            num_samples = min(samples_per_epoch(tokens, int(seq_length)), int(max_samples_per_domain)) or None
        eval_datasets[str(domain)] = GPTSampleDataset(
            indexed,
            document_range=(start, end),
            seq_length=seq_length,
            num_samples=num_samples,
            seed=domain_seed(seed, d),
            cache_dir=cache_dir,
            name=str(domain),
            barrier=barrier,
            is_builder=is_builder,
        )
    return eval_datasets


def validation_set_summary(eval_datasets: Mapping[str, GPTSampleDataset], max_samples_per_domain: int
                           ) -> tuple[dict[str, int], str]:
    """What a run is evaluated on: ``({domain: samples}, md5 of every evaluated sample's tokens, domain by
    domain)``. Runs whose hashes agree were evaluated on exactly the same samples."""
    digest = hashlib.md5()
    counts = {}
    for name, dataset in eval_datasets.items():
        counts[name] = min(len(dataset), int(max_samples_per_domain))
        digest.update(f"{name}\0{counts[name]}\0".encode())
        for index in range(counts[name]):
            digest.update(np.ascontiguousarray(dataset[index], dtype=np.int64).tobytes())
    return counts, digest.hexdigest()
