"""Pure DoReMi weight math: the exponentiated-gradient step with smoothing, and the average alpha_bar.

Domain weights are k-vectors (k = number of domains). Every function here accepts numpy arrays, torch tensors
(on any device) or plain sequences, does its arithmetic in float64 numpy on the host (the vectors are tiny, and
one code path means numpy and torch inputs give bit-identical results), and returns a float64 result of the
input's kind: a torch tensor on the input's device for tensor input, a numpy array otherwise.
"""

import math
from numbers import Real

import numpy as np
import torch

# How far from 1 the weights handed to the update may sum (rounding of a JSON round trip, float32 copies).
WEIGHT_SUM_TOLERANCE = 1e-6


def to_float64_numpy(values, name: str) -> np.ndarray:
    """A 1-D float64 numpy copy of ``values`` (numpy array, torch tensor on any device, or sequence)."""
    if isinstance(values, torch.Tensor):
        array = values.detach().to("cpu", torch.float64).numpy().copy()
    else:
        try:
            array = np.array(values, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be a vector of numbers, got {values!r}") from error
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector of length k (one entry per domain), got shape "
                         f"{tuple(array.shape)}")
    return array


def like_input(result: np.ndarray, template):
    """``result`` (float64 numpy) as the kind of ``template``: a float64 tensor on its device, else numpy."""
    if isinstance(template, torch.Tensor):
        return torch.from_numpy(result).to(template.device)
    return result


def check_finite(array: np.ndarray, name: str) -> None:
    """Raise ValueError naming the first non-finite entries of ``array``."""
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name} must be finite, got {array[bad[:5]].tolist()} at indices {bad[:5].tolist()}")


def check_distribution(weights: np.ndarray, name: str = "weights") -> None:
    """Raise ValueError unless ``weights`` is a non-empty, finite, non-negative vector summing to ~1."""
    if weights.size < 1:
        raise ValueError(f"{name} must have at least one domain, got an empty vector")
    check_finite(weights, name)
    negative = np.flatnonzero(weights < 0)
    if negative.size:
        raise ValueError(f"{name} must be >= 0, got {weights[negative[:5]].tolist()} at indices "
                         f"{negative[:5].tolist()}")
    total = float(weights.sum())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"{name} must sum to 1 (within {WEIGHT_SUM_TOLERANCE}), got sum {total!r}")


def _check_real(value, name: str, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) \
            or not low <= value <= high:
        bounds = f"[{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value!r}")
    return float(value)


def update_domain_weights(weights, excess_loss, step_size: float = 1.0, smoothing: float = 1e-3):
    """One DoReMi step: ``alpha_t = (1 - c) * softmax(log alpha_{t-1} + eta * lambda_t) + c / k``.

    ``weights`` is alpha_{t-1} (k,), ``excess_loss`` is lambda_t (k,), ``step_size`` is eta >= 0 and
    ``smoothing`` is c in [0, 1]. The exponentiated-gradient step runs in log space with the max subtracted
    before ``exp``, so lambdas of 1e3 (or eta * lambda of 1e5) cannot overflow; a zero weight stays zero
    before smoothing (log 0 = -inf). Every output weight is >= c / k and the output sums to 1.
    Pure: the inputs are not modified.
    """
    alpha = to_float64_numpy(weights, "weights")
    lam = to_float64_numpy(excess_loss, "excess_loss")
    check_distribution(alpha, "weights")
    if lam.shape != alpha.shape:
        raise ValueError(f"excess_loss must have one entry per domain like weights: got length {lam.size}, "
                         f"weights have length {alpha.size}")
    check_finite(lam, "excess_loss")
    eta = _check_real(step_size, "step_size", 0.0)
    c = _check_real(smoothing, "smoothing", 0.0, 1.0)

    # softmax is shift-invariant: shifting eta * lambda to max 0 first keeps log(alpha) from being rounded
    # against a huge common offset (with eta * lambda = 1e5 the float64 spacing is ~1e-11).
    gradient_step = eta * lam
    gradient_step -= gradient_step.max()
    with np.errstate(divide="ignore"):  # log(0) = -inf is meant: that domain gets exp(-inf) = 0
        logits = np.log(alpha) + gradient_step
    logits -= logits.max()  # the largest logit becomes 0: exp cannot overflow and the sum is >= 1
    unnormalized = np.exp(logits)
    updated = unnormalized / unnormalized.sum()
    smoothed = (1.0 - c) * updated + c / alpha.size
    return like_input(smoothed, weights)


def average_weights(weight_sum, num_steps: int):
    """alpha_bar = ``weight_sum / num_steps``, renormalised to sum exactly to 1 (num_steps >= 1).

    ``weight_sum`` is the running sum of the alpha_t of steps 1..T (not alpha_0), as the paper averages them.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    total = to_float64_numpy(weight_sum, "weight_sum")
    check_finite(total, "weight_sum")
    if total.size < 1 or (total < 0).any() or total.sum() <= 0:
        raise ValueError(f"weight_sum must be a non-empty, non-negative vector with a positive sum, got "
                         f"{total.tolist()}")
    mean = total / num_steps
    return like_input(mean / mean.sum(), weight_sum)


def max_weight_change(new_weights, old_weights) -> float:
    """``max_d |new[d] - old[d]|``: iterated DoReMi stops once this is below 1e-3 (alpha_bar vs alpha_ref)."""
    new = to_float64_numpy(new_weights, "new_weights")
    old = to_float64_numpy(old_weights, "old_weights")
    if new.shape != old.shape:
        raise ValueError(f"weight vectors differ in length: {new.size} vs {old.size}")
    return float(np.abs(new - old).max()) if new.size else 0.0
