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
  Samples are drawn through ``MixtureSampler`` (per-domain cursors, deterministic, resumable).

A new method is a subclass of ``MixturePolicy`` (``policy.py``) in its own module here, registered in
``build_mixture_policy`` and ``METHODS`` below, with its options in the ``mixing`` config section.
"""

import numpy as np

from megadoremi.data.blending import load_domain_weights
from megadoremi.data.mixing.policy import MixturePolicy, StaticMixture
from megadoremi.data.mixing.schedule import ScheduledMixture, load_schedule

METHODS = ("static", "schedule")

__all__ = ["METHODS", "MixturePolicy", "ScheduledMixture", "StaticMixture", "build_mixture_policy", "load_schedule"]


def build_mixture_policy(mixing, domain_names, base_weights) -> MixturePolicy:
    """The policy ``mixing`` (a ``MixingConfig``) selects; ``base_weights``: ``data.weights`` (None: uniform)."""
    names = list(domain_names)
    if mixing.method == "static":
        weights = load_domain_weights(base_weights, names) if base_weights is not None else \
            np.full(len(names), 1.0 / len(names))
        return StaticMixture(names, weights)
    if mixing.method == "schedule":
        return ScheduledMixture(names, load_schedule(mixing.schedule, names), source=mixing.schedule)
    raise ValueError(f"mixing.method: unknown method {mixing.method!r}; choose one of {METHODS}")
