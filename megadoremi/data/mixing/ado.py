"""``mixing.method: ado``: Adaptive Data Optimization (Jiang et al., ICLR 2025), per-domain power-law forecasts of
the training loss.

The contract is ``../shared/MIXING.md`` section 2, from the authors' code (commit bc3d8d0). After optimizer step
t (0-based, counted globally), with N_k the domain's samples in the step's global batch:

1. ``n(t) = n(t-1) + sum_k N_k``: sequences trained so far, one x axis shared by every domain (the code's
   ``use_same_step_size=True``), in sequences (samples), not tokens.
2. ``h <- (1 - gamma1) h + gamma1 N / sum N``: credit, an EMA of the realised shares (the paper: of the policy),
   every step from t = 0.
3. ``l_k(t) = S_k / C_k`` when the domain has tokens, else its last loss (the batch mean at t = 0); appended to
   the history.
4. When ``t >= warmup_steps`` and ``t % refit_interval == 0``: refit every domain's power law
   ``L(n) = eps + beta n^-alpha`` (``power_law.fit_power_laws``) to the Savitzky-Golay-smoothed history
   (window 101, order 3, ``mode='interp'``) at steps ignore_steps, ignore_steps + fit_stride, ... <= t. The fit
   runs on one rank and its K x 3 parameters are broadcast; they are accepted only if all are finite.
   Departure (MIXING.md's "first fit" pitfall): a refit needs ``min_fit_points`` points (default 20) and a
   history of at least the smoothing window, otherwise the previous fit is kept; with the reference's
   defaults the first fit (t = 1000) would see a single point.
5. Before ``warmup_steps`` or without a fit the weights are the prior mu. Otherwise, with L^_k = eps_k +
   beta_k n^-alpha_k and the forecast decrease g_k = max(alpha_k, alpha_floor) (L^_k - eps_k) / n:
   ``rho ∝ mu h^s g``, then ``rho <- max(rho, delta_min)`` renormalised; ``pi = (1 - gamma2) pibar + gamma2 rho``
   with pibar before its update; ``pibar <- (1 - 1/(t+1)) pibar + rho/(t+1)``. pi is used from step t + 1.

The state (mu, h, pibar, pi, the fit, and the loss and n histories) is in every checkpoint; a resumed run keeps
the stored fit rather than refitting, so it continues bit for bit.
"""

import base64
import time

import numpy as np

from megadoremi.data.mixing.policy import MixturePolicy
from megadoremi.data.mixing.power_law import fit_power_laws


def encode_array(array: np.ndarray) -> dict:
    """A float64 array as JSON-safe data, exactly (base64 of its bytes)."""
    array = np.ascontiguousarray(array, dtype="<f8")
    return {"shape": list(array.shape), "float64_base64": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_array(data: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data["float64_base64"]), dtype="<f8").reshape(data["shape"]).copy()


def _identity(array: np.ndarray) -> np.ndarray:
    return array


class _History:
    """Rows appended one per step, in a buffer that doubles when full (amortised O(1) per step, not O(t))."""

    def __init__(self, width: int, rows: np.ndarray | None = None):
        self._buffer = np.empty((64, width)) if rows is None else rows.copy()
        self._count = 0 if rows is None else rows.shape[0]

    def append(self, row: np.ndarray) -> None:
        if self._count == self._buffer.shape[0]:
            grow = np.empty((max(64, self._count), self._buffer.shape[1]))
            self._buffer = np.concatenate([self._buffer, grow])
        self._buffer[self._count] = row
        self._count += 1

    @property
    def rows(self) -> np.ndarray:
        return self._buffer[:self._count]


class ADOPolicy(MixturePolicy):
    """ADO; ``broadcast(array) -> array`` hands rank 0's fit to every rank, ``fits`` says whether this rank fits."""

    method = "ado"
    dynamic = True

    def __init__(self, domain_names, prior, config, warmup_steps: int, broadcast=_identity, fits: bool = True):
        """``config``: the ``mixing.ado`` section (an ADOConfig)."""
        super().__init__(domain_names, prior)
        self.config, self.warmup_steps = config, int(warmup_steps)
        self.broadcast, self.fits = broadcast, fits
        k = len(self.domain_names)
        self.prior = self.initial_weights.copy()  # mu
        self.credit = self.prior.copy()  # h
        self.average = self.prior.copy()  # pibar
        self.weights = self.prior.copy()  # pi, in force for the next step to be drawn
        self.params = None  # (k, 3): (log beta, log eps, alpha) per domain, or None before the first fit
        self.history = _History(k + 1)  # (t + 1, 1 + k): n(t), then the training loss of every domain
        self.refitted, self.fit_seconds = False, 0.0

    # --- one step -------------------------------------------------------------------------------------------

    def update(self, step: int, stats) -> np.ndarray | None:
        config = self.config
        sums, tokens, samples = stats.numpy()  # the reduction's host copy
        total = float(samples.sum())
        if total > 0:
            self.credit = (1 - config.credit_decay) * self.credit + config.credit_decay * samples / total
        previous = self.history.rows[-1] if self.history.rows.shape[0] else None
        if previous is not None:
            sequences, last = previous[0] + total, previous[1:]
        else:
            sequences, last = total, np.full(len(self.domain_names), sums.sum() / max(tokens.sum(), 1.0))
        current = np.where(tokens > 0, sums / np.where(tokens > 0, tokens, 1.0), last)
        self.history.append(np.concatenate([[sequences], current]))
        self.refitted = False
        if step >= self.warmup_steps and step % config.refit_interval == 0:
            self.refit(step)
        if step < self.warmup_steps or self.params is None:
            return None  # the prior stays in force (pibar does not move)
        preference = self.preference(sequences)
        self.weights = (1 - config.preference_weight) * self.average + config.preference_weight * preference
        self.average = (1 - 1 / (step + 1)) * self.average + preference / (step + 1)
        return self.weights.copy()

    def preference(self, sequences: float) -> np.ndarray:
        """rho: mu h^s times the forecast decrease of each domain's loss, floored at delta_min, normalised."""
        config = self.config
        log_beta, log_eps, alpha = self.params.T
        forecast = np.exp(log_eps) + np.exp(log_beta) * sequences ** -alpha
        decrease = np.maximum(alpha, config.alpha_floor) * (forecast - np.exp(log_eps)) / sequences
        preference = self.prior * self.credit ** config.credit_exponent * decrease
        preference = preference / preference.sum()
        preference = np.maximum(preference, config.min_preference)
        return preference / preference.sum()

    def fit_points(self, step: int) -> np.ndarray:
        """History rows that enter a fit at ``step``: ignore_steps, ignore_steps + fit_stride, ... <= step."""
        return np.arange(self.config.ignore_steps, step + 1, self.config.fit_stride)

    def refit(self, step: int) -> bool:
        """Fit the power laws to the history up to ``step`` (collective: every rank calls it; rank 0 fits and
        broadcasts). The loop calls it every ``refit_interval`` steps; returns whether a new fit was accepted."""
        config, k = self.config, len(self.domain_names)
        rows, history = self.fit_points(step), self.history.rows
        if rows.size < config.min_fit_points or history.shape[0] < config.smoothing_window:
            return False
        started = time.perf_counter()
        params = np.full((k, 3), np.nan)
        if self.fits:
            from scipy.signal import savgol_filter

            smoothed = savgol_filter(history[:, 1:], config.smoothing_window, config.smoothing_order, axis=0,
                                     mode="interp")  # (t + 1, k)
            x, y = history[rows, 0], smoothed[rows].T  # (N,), (k, N)
            if (x > 0).all() and (y > 0).all():
                params = fit_power_laws(x, y)[0]
        params = self.broadcast(params)
        self.fit_seconds = time.perf_counter() - started
        if np.isfinite(params).all():
            self.params, self.refitted = params, True
        return self.refitted

    # --- logs and state -------------------------------------------------------------------------------------

    def log_record(self) -> dict:
        record = {"ado_credit": dict(zip(self.domain_names, self.credit.tolist()))}
        if self.refitted:
            record["ado_fit"] = {name: {"log_beta": p[0], "log_eps": p[1], "alpha": p[2]}
                                 for name, p in zip(self.domain_names, self.params.tolist())}
            record["ado_fit_seconds"] = self.fit_seconds
        return record

    def describe(self) -> dict:
        return {"method": self.method, "prior": self.prior.tolist(), "warmup_steps": self.warmup_steps,
                **{key: getattr(self.config, key) for key in vars(self.config)}}

    def state_dict(self) -> dict:
        return {"method": self.method, "credit": encode_array(self.credit), "average": encode_array(self.average),
                "weights": encode_array(self.weights), "prior": encode_array(self.prior),
                "params": None if self.params is None else encode_array(self.params),
                "history": encode_array(self.history.rows)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        prior = decode_array(state["prior"])
        if prior.shape != self.prior.shape or not np.array_equal(prior, self.prior):
            raise ValueError(f"checkpoint's ADO prior {prior.tolist()} differs from this run's {self.prior.tolist()} "
                             "(mixing.prior changed?)")
        self.credit, self.average = decode_array(state["credit"]), decode_array(state["average"])
        self.weights = decode_array(state["weights"])
        self.params = None if state["params"] is None else decode_array(state["params"])
        history = decode_array(state["history"])
        if history.ndim != 2 or history.shape[1] != len(self.domain_names) + 1:
            raise ValueError(f"checkpoint's ADO history has shape {history.shape}, expected (steps, "
                             f"{len(self.domain_names) + 1})")
        self.history = _History(history.shape[1], history)
