"""The checkpointable Group DRO state of a proxy run: alpha_t, the running sum for alpha_bar, lambda_t, step."""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np

from megadoremi.doremi.stats import domain_excess_loss, initial_excess_loss
from megadoremi.doremi.weights import (
    average_weights, check_distribution, check_finite, to_float64_numpy, update_domain_weights,
)

STATE_VERSION = 1
_FIELDS = ("version", "domain_names", "weights", "weight_sum", "excess_loss", "step", "step_size", "smoothing")


def _check_domain_names(domain_names) -> list[str]:
    if isinstance(domain_names, str) or not isinstance(domain_names, Sequence):
        raise ValueError(f"domain_names must be a sequence of strings, got {domain_names!r}")
    names = list(domain_names)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"domain_names must be non-empty strings, at least one, got {names!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"domain_names must be unique, got duplicates {duplicates}")
    return names


def _describe_name_mismatch(expected: list[str], found: list[str]) -> str:
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    if missing or extra:
        return f"missing {missing}, unexpected {extra}"
    return f"same domains in a different order: expected {expected}, got {found}"


@dataclass(eq=False)
class DROState:
    """alpha_t (``weights``), sum of alpha_1..alpha_t (``weight_sum``), lambda_t (``excess_loss``), ``step`` = t.

    Vectors are float64 numpy arrays of length k, in the order of ``domain_names`` (domain id = position).
    """

    domain_names: list[str]
    weights: np.ndarray
    weight_sum: np.ndarray
    excess_loss: np.ndarray
    step: int = 0
    step_size: float = 1.0
    smoothing: float = 1e-3

    def __post_init__(self):
        self.domain_names = _check_domain_names(self.domain_names)
        num_domains = len(self.domain_names)
        for name in ("weights", "weight_sum", "excess_loss"):
            array = to_float64_numpy(getattr(self, name), name)
            if array.size != num_domains:
                raise ValueError(f"DRO state {name} has {array.size} entries for {num_domains} domains "
                                 f"{self.domain_names}")
            check_finite(array, name)
            setattr(self, name, array)
        check_distribution(self.weights, "weights")
        if isinstance(self.step, bool) or not isinstance(self.step, int | np.integer) or self.step < 0:
            raise ValueError(f"step must be an integer >= 0, got {self.step!r}")
        self.step = int(self.step)
        for name, low, high in (("step_size", 0.0, math.inf), ("smoothing", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not low <= value <= high \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
            setattr(self, name, float(value))
        if (self.weight_sum < 0).any():
            raise ValueError(f"weight_sum must be >= 0, got {self.weight_sum.tolist()}")
        # Each alpha_t sums to 1, so the running sum of t of them sums to t.
        if abs(float(self.weight_sum.sum()) - self.step) > 1e-6 * max(1, self.step):
            raise ValueError(f"weight_sum sums to {float(self.weight_sum.sum())!r} but must sum to step = "
                             f"{self.step} (the sum of {self.step} weight vectors)")

    @classmethod
    def initial(cls, domain_names: Sequence[str], vocab_size: int, initial_weights=None, step_size: float = 1.0,
                smoothing: float = 1e-3) -> "DROState":
        """Step 0: alpha_0 = ``initial_weights`` (uniform if None; a mapping by name or a sequence, normalised),
        lambda_0 = log(vocab_size) per domain, empty running sum."""
        names = _check_domain_names(domain_names)
        if initial_weights is None:
            weights = np.full(len(names), 1.0 / len(names))
        else:
            if isinstance(initial_weights, Mapping):
                if set(initial_weights) != set(names):
                    raise ValueError("initial_weights must name exactly the domains: "
                                     + _describe_name_mismatch(names, list(initial_weights)))
                initial_weights = [initial_weights[name] for name in names]
            weights = to_float64_numpy(initial_weights, "initial_weights")
            if weights.size != len(names):
                raise ValueError(f"initial_weights has {weights.size} entries for {len(names)} domains {names}")
            check_finite(weights, "initial_weights")
            if (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"initial_weights must be >= 0 with a positive sum, got {weights.tolist()}")
            weights = weights / weights.sum()
        return cls(domain_names=names, weights=weights, weight_sum=np.zeros(len(names)),
                   excess_loss=initial_excess_loss(len(names), vocab_size), step=0, step_size=step_size,
                   smoothing=smoothing)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def update(self, sums, counts) -> None:
        """One DRO step from the global (already reduced) per-domain excess-loss sums and token counts (k,).

        lambda_t = sums / counts (absent domains keep lambda_{t-1}); alpha_t = update_domain_weights(alpha_{t-1},
        lambda_t); the running sum gains alpha_t; step += 1. On a ValueError the state is left unchanged.
        """
        excess_loss = domain_excess_loss(sums, counts, self.excess_loss)
        weights = update_domain_weights(self.weights, excess_loss, self.step_size, self.smoothing)
        self.excess_loss, self.weights = excess_loss, weights
        self.weight_sum = self.weight_sum + weights
        self.step += 1

    @property
    def average_weights(self) -> np.ndarray:
        """alpha_bar = (1/T) sum_{t=1..T} alpha_t, normalised; the current (initial) weights at step 0."""
        if self.step == 0:
            return self.weights.copy()
        return average_weights(self.weight_sum, self.step)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (floats round-trip exactly through ``json``)."""
        return {
            "version": STATE_VERSION,
            "domain_names": list(self.domain_names),
            "weights": self.weights.tolist(),
            "weight_sum": self.weight_sum.tolist(),
            "excess_loss": self.excess_loss.tolist(),
            "step": self.step,
            "step_size": self.step_size,
            "smoothing": self.smoothing,
        }

    @classmethod
    def from_dict(cls, data: Mapping, domain_names: Sequence[str] | None = None) -> "DROState":
        """Inverse of ``to_dict``; with ``domain_names``, the saved domains must be exactly those, in order."""
        if not isinstance(data, Mapping):
            raise ValueError(f"DRO state must be a mapping, got {type(data).__name__}")
        missing = [key for key in _FIELDS if key not in data]
        unknown = sorted(set(data) - set(_FIELDS))
        if missing or unknown:
            raise ValueError(f"DRO state fields: missing {missing}, unknown {unknown}")
        if data["version"] != STATE_VERSION:
            raise ValueError(f"DRO state version {data['version']!r} is not supported (expected {STATE_VERSION})")
        saved_names = _check_domain_names(data["domain_names"])
        if domain_names is not None:
            expected = _check_domain_names(domain_names)
            if saved_names != expected:
                raise ValueError("DRO state domain names do not match the run's domains: "
                                 + _describe_name_mismatch(expected, saved_names))
        return cls(**{key: data[key] for key in _FIELDS if key != "version"})

    def trajectory_record(self) -> dict:
        """The per-step jsonl line: ``{"step", "weights": {domain: alpha_t}, "excess_loss": {domain: lambda_t}}``."""
        return {
            "step": self.step,
            "weights": {name: float(w) for name, w in zip(self.domain_names, self.weights)},
            "excess_loss": {name: float(value) for name, value in zip(self.domain_names, self.excess_loss)},
        }
