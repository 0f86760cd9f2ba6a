"""The mixture-policy interface (see ``megadoremi.data.mixing``) and the static policy."""

import numpy as np


class MixturePolicy:
    """Base class: sampling weights per step. ``dynamic`` policies may change the weights during a run."""

    method = "base"
    dynamic = False

    def __init__(self, domain_names, initial_weights: np.ndarray):
        self.domain_names = list(domain_names)
        self.initial_weights = np.asarray(initial_weights, dtype=np.float64)  # (k,) the weights of step 0

    def update(self, step: int, stats) -> np.ndarray | None:
        """After optimizer step ``step`` (0-based), with its all-reduced ``stats`` (a ``DomainStats``): the weights
        for step + 1, or None to keep the current ones."""
        return None

    def log_record(self) -> dict:
        """Method-specific fields for this step's line of ``mixing_trajectory.jsonl`` (JSON-serialisable)."""
        return {}

    def describe(self) -> dict:
        """What determines the policy's weights (part of the training stream's identity), JSON-serialisable."""
        return {"method": self.method}

    def state_dict(self) -> dict:
        return {"method": self.method}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method:
            raise ValueError(f"checkpoint holds the state of mixing method {state.get('method')!r}, this run uses "
                             f"{self.method!r}")


class StaticMixture(MixturePolicy):
    """Fixed weights for the whole run."""

    method = "static"

    def describe(self) -> dict:
        return {"method": self.method, "weights": self.initial_weights.tolist()}
