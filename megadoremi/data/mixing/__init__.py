"""Mixture policies: the sampling weights over the domains, step by step (the data-mixture seam of the loop).

The trainer asks the policy once for the weights of step 0 and then, after every optimizer step t, calls
``update(t, stats)`` with the step's per-domain training statistics, already all-reduced over the data-parallel
group (``megadoremi.distributed.stats.DomainStats``: float64 loss sums, token counts and sample counts per
domain, from the forward pass of step t). New weights returned there take effect at step t + 1: the training
stream draws step t + 1's samples only after the update. Every rank calls ``update`` with the same numbers and
must return the same weights (anything non-deterministic runs on one rank and is broadcast); the policy's
``state_dict`` goes into every checkpoint, next to the stream's sampler state.

- ``StaticMixture`` (``mixing.method: static``, the default): fixed weights (``data.weights``, or uniform). The
  stream is Megatron's greedy blend, so the sample order is identical to Megatron's.
- ``ScheduledMixture`` (``mixing.method: schedule``): weights per step range from a JSON file
  ``{"0": {domain: weight, ...}, "1000": {...}}``; the weights listed at step s are in force from step s on.
- ``ADOPolicy`` (``mixing.method: ado``, ``ado.py``): per-domain power-law forecasts of the training loss.
- ``ODMPolicy`` (``mixing.method: odm``, ``odm.py``): a bandit rewarded by the domains' training loss.
Dynamic policies' samples are drawn through ``MixtureSampler`` (per-domain cursors, deterministic, resumable).
ADO and ODM start from a prior (``mixing.prior``: natural token shares by default) for ``mixing.warmup_steps``.

A new method is a subclass of ``MixturePolicy`` (``policy.py``) in its own module here, registered in
``build_mixture_policy`` and ``METHODS`` below, with its options in the ``mixing`` config section.
"""

import numpy as np

from megadoremi.data.blending import load_domain_weights, natural_weights
from megadoremi.data.mixing.ado import ADOPolicy
from megadoremi.data.mixing.odm import ODMPolicy
from megadoremi.data.mixing.policy import MixturePolicy, StaticMixture
from megadoremi.data.mixing.schedule import ScheduledMixture, load_schedule

METHODS = ("static", "schedule", "ado", "odm")
DEFAULT_WARMUP_STEPS = {"ado": 500, "odm": 2000}  # the authors' Pile settings (MIXING.md)

__all__ = ["METHODS", "ADOPolicy", "MixturePolicy", "ODMPolicy", "ScheduledMixture", "StaticMixture",
           "build_mixture_policy", "load_schedule", "resolve_prior"]


def resolve_prior(prior, data) -> np.ndarray:
    """``mixing.prior`` as weights (k,): natural (token shares of the training splits), uniform, a weights JSON
    file or a {domain: weight} mapping."""
    names = list(data.domains)
    if prior == "natural":
        return natural_weights(data.domains, data.split)
    if prior == "uniform":
        return np.full(len(names), 1.0 / len(names))
    return load_domain_weights(prior, names)


def build_mixture_policy(mixing, data, broadcast=None, fits: bool = True) -> MixturePolicy:
    """The policy ``mixing`` (a MixingConfig) selects over ``data.domains`` (a DataConfig; ``data.weights`` is the
    static mixture, None: uniform). ``broadcast(array) -> array`` gives every rank rank 0's array and ``fits``
    says whether this rank is that rank (ADO's curve fit runs on one rank)."""
    names = list(data.domains)
    if mixing.method == "static":
        weights = load_domain_weights(data.weights, names) if data.weights is not None else \
            np.full(len(names), 1.0 / len(names))
        return StaticMixture(names, weights)
    if mixing.method == "schedule":
        return ScheduledMixture(names, load_schedule(mixing.schedule, names), source=mixing.schedule)
    if mixing.method not in METHODS:
        raise ValueError(f"mixing.method: unknown method {mixing.method!r}; choose one of {METHODS}")
    prior = resolve_prior(mixing.prior, data)
    warmup = DEFAULT_WARMUP_STEPS[mixing.method] if mixing.warmup_steps is None else mixing.warmup_steps
    if mixing.method == "ado":
        return ADOPolicy(names, prior, mixing.ado, warmup, broadcast=broadcast or (lambda array: array), fits=fits)
    return ODMPolicy(names, prior, warmup, mixing.odm.smoothing, mixing.odm.variant)
