"""ADO's per-domain power-law fit, batched over domains and starting points (``../shared/MIXING.md`` section 2).

Model, in log space: ``P(x) = log(exp(e) + exp(a) x^-alpha)`` = ``logaddexp(a - alpha log x, e)``, i.e. the loss
curve ``L(n) = eps + beta n^-alpha`` with ``a = log beta`` and ``e = log eps``. Objective per domain:

    J = sum_tau Huber_delta(P(x_tau) - log y_tau) + max(alpha - 0.8, 0) - min(alpha, 0.001)
        + max(a - 6.5, 0) + max(0.5 - e, 0),          delta = 1e-3

(soft bounds alpha in [0, 0.8], log beta <= 6.5, log eps >= 0.5), from the 8 x 8 x 8 grid of starts of the
reference code (a in -2..5, e in -2..1.5 by 0.5, alpha in 0..0.7 by 0.1, a slowest), keeping the start with the
smallest final J (NaN ignored, ties to the first in grid order).

The reference runs L-BFGS (tolerance 1e-5, at most 200 iterations) from every start on every point. Here the
minimiser is a batched Levenberg-Marquardt on the iteratively reweighted least-squares form of the Huber loss
(weights ``min(1, delta / |r|)``, the penalties' slopes in the gradient), with a fixed number of iterations, all
in float64 numpy: first every start on at most ``STAGE1_POINTS`` evenly spaced points, then the best
``STAGE2_STARTS`` starts of each domain on all points. The second stage decides among those by J on all points.
A start whose basin the subsample misjudges can be missed; the tests check that known parameters are recovered
from noisy curves.
"""

import numpy as np

HUBER_DELTA = 1e-3
ALPHA_SCAN = np.linspace(0.0, 0.8, 81)  # starting exponents, every 0.01 over the soft bounds
SCAN_POINTS = 256  # points the starts are compared on
REFINE_STARTS, REFINE_ITERATIONS = 2, 30


def huber(residuals: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    absolute = np.abs(residuals)
    return np.where(absolute <= delta, 0.5 * residuals**2, delta * (absolute - 0.5 * delta))


def penalty(theta: np.ndarray) -> np.ndarray:
    """The soft bounds, theta (..., 3) -> (...)."""
    a, e, alpha = theta[..., 0], theta[..., 1], theta[..., 2]
    return (np.maximum(alpha - 0.8, 0) - np.minimum(alpha, 0.001) + np.maximum(a - 6.5, 0)
            + np.maximum(0.5 - e, 0))


def _penalty_gradient(theta: np.ndarray) -> np.ndarray:
    a, e, alpha = theta[..., 0], theta[..., 1], theta[..., 2]
    return np.stack([(a > 6.5).astype(float), -(e < 0.5).astype(float),
                     (alpha > 0.8).astype(float) - (alpha < 0.001).astype(float)], axis=-1)


def _forward(theta: np.ndarray, log_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P = logaddexp(a - alpha log x, e) and dP/da = sigmoid(a - alpha log x - e), both (B, N), without overflow."""
    z = theta[:, 0:1] - theta[:, 2:3] * log_x
    e = theta[:, 1:2]
    difference = z - e
    decay = np.exp(-np.abs(difference))  # in (0, 1]
    prediction = np.maximum(z, e) + np.log1p(decay)
    slope = np.where(difference > 0, 1.0, decay) / (1.0 + decay)
    return prediction, slope


def predict(theta: np.ndarray, log_x: np.ndarray) -> np.ndarray:
    """P = logaddexp(a - alpha log x, e): theta (B, 3), log_x (N,) -> (B, N)."""
    return _forward(np.atleast_2d(theta), log_x)[0]


def objective(theta: np.ndarray, log_x: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """J for theta (B, 3) against log_y (B, N) at log_x (N,) -> (B,)."""
    return huber(predict(theta, log_x) - log_y).sum(axis=-1) + penalty(theta)


CHUNK_ELEMENTS = 1 << 15  # problems x points per block: the block's working arrays stay in the CPU caches


class _Block:
    """Working arrays of a block of problems: theta (b, 3) against log_y (b, N) at log_x (N,)."""

    def __init__(self, log_x: np.ndarray, log_y: np.ndarray):
        self.log_x, self.log_x2, self.log_y = log_x, log_x * log_x, log_y
        shape = log_y.shape
        self.d, self.q, self.r, self.t, self.m = (np.empty(shape) for _ in range(5))

    def value(self, theta: np.ndarray) -> np.ndarray:
        """J per problem (b,); leaves d = a - e - alpha log x, q = exp(-|d|), r = P - log y, t = |r|,
        m = min(|r|, delta) in the block's arrays."""
        d, q, r, t, m = self.d, self.q, self.r, self.t, self.m
        a, e, alpha = theta[:, 0:1], theta[:, 1:2], theta[:, 2:3]
        np.multiply(alpha, self.log_x, out=d)
        np.subtract(a - e, d, out=d)
        np.abs(d, out=q)
        np.negative(q, out=q)
        np.exp(q, out=q)
        np.maximum(d, 0.0, out=r)  # P = e + max(d, 0) + log1p(exp(-|d|))
        np.log1p(q, out=t)
        r += t
        r += e
        r -= self.log_y
        np.abs(r, out=t)
        np.minimum(t, HUBER_DELTA, out=m)
        huber_terms = m * (t - 0.5 * m)  # Huber = m (|r| - m / 2) with m = min(|r|, delta)
        return huber_terms.sum(axis=1) + penalty(theta)

    def newton_system(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The IRLS normal matrix (b, 3, 3) and the gradient (b, 3) at the theta of the last ``value`` call."""
        d, q, r, t, m = self.d, self.q, self.r, self.t, self.m
        s = 1.0 / (1.0 + q)  # sigmoid(d) where d > 0, and q * that elsewhere
        np.multiply(s, q, out=s, where=d <= 0)
        w = m / np.maximum(t, 1e-300)  # IRLS weights min(1, delta / |r|)
        psi = np.copysign(m, r)  # Huber'(r) = clip(r, -delta, delta)
        ws = w * s
        wss = ws * s
        sum_w, sum_ws, sum_wss = w.sum(1), ws.sum(1), wss.sum(1)
        ws_u, wss_u, wss_u2 = ws @ self.log_x, wss @ self.log_x, wss @ self.log_x2
        hessian = np.empty((theta.shape[0], 3, 3))
        hessian[:, 0, 0] = sum_wss
        hessian[:, 0, 1] = hessian[:, 1, 0] = sum_ws - sum_wss
        hessian[:, 1, 1] = sum_w - 2.0 * sum_ws + sum_wss
        hessian[:, 0, 2] = hessian[:, 2, 0] = -wss_u
        hessian[:, 1, 2] = hessian[:, 2, 1] = -(ws_u - wss_u)
        hessian[:, 2, 2] = wss_u2
        psi_s = psi * s
        sum_psi_s = psi_s.sum(1)
        gradient = np.stack([sum_psi_s, psi.sum(1) - sum_psi_s, -(psi_s @ self.log_x)], axis=1)
        return hessian, gradient + _penalty_gradient(theta)


def _minimise(theta: np.ndarray, log_x: np.ndarray, log_y: np.ndarray, iterations: int) -> tuple:
    """Levenberg-Marquardt on the IRLS form of J for every row of theta (B, 3); returns (theta, J).

    Jacobian columns per point: dP/da = s, dP/de = 1 - s, dP/dalpha = -s log x (s = sigmoid(a - alpha log x - e));
    the 3 x 3 normal matrix and the gradient are sums over points, formed from row sums and products with the
    shared log x. Problems are independent and processed in blocks of about ``CHUNK_ELEMENTS`` values.
    """
    theta = theta.copy()
    values = np.empty(theta.shape[0])
    rows = max(1, CHUNK_ELEMENTS // log_x.shape[0])
    eye = np.eye(3)
    for start in range(0, theta.shape[0], rows):
        block = _Block(log_x, log_y[start:start + rows])
        current = theta[start:start + rows]
        value = block.value(current)
        damping = np.full(current.shape[0], 1e-3)
        for _ in range(iterations):
            hessian, gradient = block.newton_system(current)
            system = hessian + damping[:, None, None] * (hessian * eye + 1e-9 * eye)
            candidate = current - np.linalg.solve(system, gradient[..., None])[..., 0]
            candidate_value = block.value(candidate)
            better = np.isfinite(candidate_value) & (candidate_value < value)
            current[better], value[better] = candidate[better], candidate_value[better]
            damping = np.where(better, damping / 3.0, np.minimum(damping * 4.0, 1e12))
            if not better.all():  # the block's arrays must describe the current theta for the next system
                value = block.value(current)
        theta[start:start + rows], values[start:start + rows] = current, value
    return theta, values


def scan_starts(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Starting points for every domain and every alpha of ``ALPHA_SCAN``: the (eps, beta) of ``eps + beta x^-alpha``
    closest to the curve in relative least squares (``sum ((eps + beta v) / y - 1)^2``, v = x^-alpha), solved
    exactly from sums. Returns theta (K, len(ALPHA_SCAN), 3); coefficients that come out <= 0 are clamped."""
    v = np.exp(-np.outer(ALPHA_SCAN, np.log(x)))  # (A, N)
    inverse = 1.0 / y  # (K, N)
    inverse2 = inverse * inverse
    s_vv, s_v, s_vy = inverse2 @ (v * v).T, inverse2 @ v.T, inverse @ v.T  # (K, A)
    s_11, s_1y = inverse2.sum(1, keepdims=True), inverse.sum(1, keepdims=True)  # (K, 1)
    determinant = s_vv * s_11 - s_v * s_v
    safe = np.where(np.abs(determinant) > 0, determinant, 1.0)
    beta = (s_vy * s_11 - s_v * s_1y) / safe
    eps = (s_vv * s_1y - s_v * s_vy) / safe
    floor = 1e-3 * y.min(axis=1, keepdims=True)
    eps, beta = np.maximum(eps, floor), np.maximum(beta, 1e-12)
    alpha = np.broadcast_to(ALPHA_SCAN, beta.shape)
    return np.stack([np.log(beta), np.log(eps), alpha], axis=-1)


def fit_power_laws(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit every domain's curve: x (N,) > 0 shared, y (K, N) > 0; returns theta (K, 3) = (a, e, alpha) and J (K,).

    A domain whose best J is not finite gets NaN parameters (the caller then keeps its previous fit).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or y.ndim != 2 or y.shape[1] != x.shape[0] or x.shape[0] == 0:
        raise ValueError(f"power-law fit: x must be (N,) and y (K, N), got {x.shape} and {y.shape}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("power-law fit: x (sequences seen) and y (losses) must be > 0")
    log_x, log_y = np.log(x), np.log(y)
    num_domains = y.shape[0]
    # Stage 1: for every alpha of the scan, the best (eps, beta) in relative least squares; J on a subsample.
    starts = scan_starts(x, y)  # (K, A, 3)
    subsample = np.unique(np.linspace(0, x.shape[0] - 1, min(SCAN_POINTS, x.shape[0])).round().astype(int))
    scan_value = objective(starts.reshape(-1, 3), log_x[subsample],
                           np.repeat(log_y[:, subsample], starts.shape[1], axis=0)).reshape(num_domains, -1)
    scan_value = np.where(np.isfinite(scan_value), scan_value, np.inf)
    best = np.argsort(scan_value, axis=1, kind="stable")[:, :REFINE_STARTS]  # (K, M), ties to the lower alpha
    # Stage 2: Levenberg-Marquardt from the best starts of each domain on all points; the smallest J wins.
    theta = starts[np.arange(num_domains)[:, None], best].reshape(-1, 3)
    theta, value = _minimise(theta, log_x, np.repeat(log_y, best.shape[1], axis=0), REFINE_ITERATIONS)
    value = np.where(np.isfinite(value), value, np.inf).reshape(num_domains, -1)
    winner = np.argmin(value, axis=1)
    theta = theta.reshape(num_domains, -1, 3)[np.arange(num_domains), winner]
    value = value[np.arange(num_domains), winner]
    theta[~np.isfinite(value)] = np.nan
    return theta, value
