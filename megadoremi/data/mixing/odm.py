"""``mixing.method: odm``: Online Data Mixing (Albalak et al. 2023), a bandit over domains rewarded by their loss.

The contract is ``../shared/MIXING.md`` section 3, from the authors' code (``SmoothedMeanWeightUpdater``):

- Warm-up: for the first ``warmup_steps`` completed steps the batches come from the prior and the rewards are
  discarded (the reward estimates stay 0).
- After step t (T = t + 1 completed steps, counted globally, never from the end of the warm-up), for every
  domain observed in the step's global batch, with r_k its mean token loss:
    ``variant: smoothed_mean`` (the code's, default): R_k <- a R_k + (1 - a) exp(r_k); then
        pi_k = (1 - K eps_T) R_k / sum_j R_j + eps_T, with eps_T = min(1/K, sqrt(ln K / (K T)))
    ``variant: paper`` (Exp3 with a smoothed, importance-weighted reward):
        R_k <- a R_k + (1 - a) r_k / q_k;  pi_k = (1 - K eps_T) softmax(eps_{T-1} R)_k + eps_T
    ``variant: exp3`` (the code's ``Exp3WeightUpdater``): R_k <- R_k + (r_k / 10) / q_k, the same softmax policy.
  Unobserved domains keep their R_k. q_k is the probability that domain k is observed in the step: per-sample
  mixing draws M samples per step (the global batch), so q_k = 1 - (1 - pi_k)^M rather than pi_k (dividing by
  pi_k, as bandit feedback would, inflates rare domains' rewards ~M-fold: MIXING.md's pitfall). eps starts at
  1/K (eps_{T-1} of the first update).
- Per-sample mixing (every sample's domain drawn from pi) instead of the code's one domain per micro-batch: a
  deliberate departure, documented; most domains are observed every step.

The smoothing ``a`` has no default: 0.5 is the value of the authors' later runs (the likelier paper value), 0.9
the argument default of their code.
"""

import math

import numpy as np

from megadoremi.data.mixing.policy import MixturePolicy

VARIANTS = ("smoothed_mean", "paper", "exp3")
EXP3_REWARD_SCALE = 0.1  # the code's r / 10, against overflow of exp(eps * R) in the cumulative form


def exploration_rate(num_domains: int, completed_steps: int) -> float:
    """eps_T = min(1/K, sqrt(ln K / (K T)))."""
    return min(1.0 / num_domains, math.sqrt(math.log(num_domains) / (num_domains * completed_steps)))


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()


class ODMPolicy(MixturePolicy):
    """The bandit; state: reward estimates R (k,), the weights pi, eps and the previous eps, the step count."""

    method = "odm"
    dynamic = True

    def __init__(self, domain_names, prior, warmup_steps: int, smoothing: float, variant: str = "smoothed_mean"):
        super().__init__(domain_names, prior)
        if variant not in VARIANTS:
            raise ValueError(f"mixing.odm.variant: must be one of {VARIANTS}, got {variant!r}")
        self.warmup_steps, self.smoothing, self.variant = int(warmup_steps), float(smoothing), variant
        k = len(self.domain_names)
        self.rewards = np.zeros(k)  # R (k,)
        self.weights = self.initial_weights.copy()  # pi in force for the next step to be drawn
        self.epsilon = 1.0 / k
        self.completed_steps = 0

    def update(self, step: int, stats) -> np.ndarray | None:
        self.completed_steps = step + 1
        if self.completed_steps <= self.warmup_steps:
            return None  # warm-up: sample from the prior, discard the rewards
        k = len(self.domain_names)
        sums, tokens, samples = stats.numpy()  # the reduction's host copy
        observed = tokens > 0
        losses = sums[observed] / tokens[observed]  # r_k, mean token loss
        previous_epsilon, self.epsilon = self.epsilon, exploration_rate(k, self.completed_steps)
        if self.variant == "smoothed_mean":
            a = self.smoothing
            self.rewards[observed] = a * self.rewards[observed] + (1 - a) * np.exp(losses)
            if self.rewards.sum() <= 0:
                return None
            weights = (1 - k * self.epsilon) * self.rewards / self.rewards.sum() + self.epsilon
        else:
            draws = float(samples.sum())  # M: samples drawn in the step
            observation = 1.0 - (1.0 - self.weights[observed]) ** draws  # q_k
            if self.variant == "paper":
                a = self.smoothing
                self.rewards[observed] = a * self.rewards[observed] + (1 - a) * losses / observation
            else:
                self.rewards[observed] += EXP3_REWARD_SCALE * losses / observation
            weights = (1 - k * self.epsilon) * _softmax(previous_epsilon * self.rewards) + self.epsilon
        self.weights = weights / weights.sum()
        return self.weights.copy()

    def log_record(self) -> dict:
        return {"odm_rewards": dict(zip(self.domain_names, self.rewards.tolist())), "odm_epsilon": self.epsilon}

    def describe(self) -> dict:
        return {"method": self.method, "prior": self.initial_weights.tolist(), "warmup_steps": self.warmup_steps,
                "smoothing": self.smoothing, "variant": self.variant}

    def state_dict(self) -> dict:
        return {"method": self.method, "variant": self.variant, "rewards": self.rewards.tolist(),
                "weights": self.weights.tolist(), "epsilon": self.epsilon, "completed_steps": self.completed_steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("variant") != self.variant:
            raise ValueError(f"checkpoint holds ODM variant {state.get('variant')!r}, this run uses {self.variant!r}")
        rewards, weights = np.asarray(state["rewards"], np.float64), np.asarray(state["weights"], np.float64)
        if rewards.shape != self.rewards.shape or weights.shape != self.weights.shape:
            raise ValueError(f"ODM state has {rewards.size} domains, this run has {self.rewards.size}")
        self.rewards, self.weights = rewards, weights
        self.epsilon, self.completed_steps = float(state["epsilon"]), int(state["completed_steps"])
