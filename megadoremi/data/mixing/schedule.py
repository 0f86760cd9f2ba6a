"""``mixing.method: schedule``: weights that change at fixed steps, from a JSON file."""

import hashlib
import json

import numpy as np

from megadoremi.data.blending import load_domain_weights
from megadoremi.data.mixing.policy import MixturePolicy


def load_schedule(path: str, domain_names) -> dict[int, np.ndarray]:
    """``{first step: normalised weights (k,)}`` from a JSON file ``{"0": {domain: weight}, "1000": {...}}``.

    Steps are non-negative integers and step 0 must be listed; each entry names every domain (as
    ``load_domain_weights`` requires). Errors name the file and the entry.
    """
    try:
        with open(path) as handle:
            data = json.load(handle)
    except OSError as error:
        raise ValueError(f"mixing.schedule {path}: cannot read it ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"mixing.schedule {path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f'mixing.schedule {path}: expected a JSON object {{"step": {{"domain": weight}}, ...}}')
    schedule = {}
    for key, weights in data.items():
        try:
            step = int(key)
        except ValueError:
            step = -1
        if step < 0 or str(step) != key.strip():
            raise ValueError(f"mixing.schedule {path}: key {key!r} is not a step number (an integer >= 0)")
        try:
            schedule[step] = load_domain_weights(weights, domain_names)
        except ValueError as error:
            raise ValueError(f"mixing.schedule {path}, step {key}: {error}") from None
    if 0 not in schedule:
        raise ValueError(f"mixing.schedule {path}: the schedule must give the weights of step 0 (key \"0\")")
    return dict(sorted(schedule.items()))


class ScheduledMixture(MixturePolicy):
    """Weights that change at fixed steps, read from a schedule file."""

    method = "schedule"
    dynamic = True

    def __init__(self, domain_names, schedule: dict[int, np.ndarray], source: str = ""):
        self.schedule = schedule
        self.source = source
        super().__init__(domain_names, schedule[0])
        canonical = json.dumps({str(step): weights.tolist() for step, weights in schedule.items()})
        self.fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def weights_at(self, step: int) -> np.ndarray:
        """The weights in force at ``step``: the entry with the largest first step <= ``step``."""
        return self.schedule[max(first for first in self.schedule if first <= step)]

    def update(self, step: int, stats) -> np.ndarray | None:
        following = step + 1
        return self.schedule[following] if following in self.schedule else None

    def describe(self) -> dict:
        return {"method": self.method, "schedule": {str(step): w.tolist() for step, w in self.schedule.items()}}

    def state_dict(self) -> dict:
        return {"method": self.method, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"mixing.schedule {self.source}: the schedule differs from the one the checkpoint was "
                             "trained with; resuming would change the data already planned")
