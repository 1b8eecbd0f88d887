"""Two-component 1-D Gaussian mixture for the epoch-level clean selection.

With `loss.selection="epoch_gmm"` (docs/method.md §Parts) each training pair's
in-batch cross-entropy and energy are collected once per epoch; a pair is clean
when the low-mean component of a 2-Gaussian mixture fitted to each statistic
claims it.

The fit follows scikit-learn's `GaussianMixture(n_components=2, max_iter=10,
tol=1e-2, reg_covar=5e-4)` that NCR-style code uses, in NumPy float64 with no
scikit-learn dependency:
- the input is min-max normalised to [0, 1] inside `fit_gmm_1d`; the returned
  `GMM1D` holds the parameters on that scale plus `offset` and `scale`, and
  `clean_posterior` applies the same map to its input;
- initial responsibilities come from 2-means (k-means++ seeding from `seed`,
  then Lloyd steps), so the fit is deterministic for a given seed;
- `reg` is added to every variance after each M-step, so none falls below it;
- EM stops after `iters` iterations or once the mean log-likelihood changes by
  less than `tol`;
- components are sorted by mean: index 0 is the low-mean (clean) one; equal
  means keep the 2-means order, as `means_.argmin()` picks the first.

From the same initial parameters the EM is scikit-learn's: posteriors agree to
~1e-15 (tests/test_gmm.py). The starts differ, as scikit-learn's own do from
one `random_state` to the next (NCR passes none): its `KMeans(n_init=1)` seeds
greedily (best of 2 candidates per centre) and stops Lloyd once the squared
centre shift falls to 1e-4 x the data variance; ours seeds with one candidate,
runs Lloyd to a fixed point and puts a point equidistant from both centres in
the first. On 1-D losses both reach the same partition or one a few boundary
points away, and our posteriors differ from scikit-learn's runs by no more than
those runs differ among themselves. Also unlike NCR: constant input maps to 0
(NCR's min-max divides by zero), and the fit runs in float64 (NCR hands
scikit-learn float32 losses).

    clean = gmm_clean_mask(ce, energy)  # (N,) bool, both statistics agree
"""

from typing import NamedTuple

import numpy as np

_TINY_COUNT = 10 * np.finfo(np.float64).eps
_MAX_LLOYD_STEPS = 100


class GMM1D(NamedTuple):
  """A fitted mixture; means/variances/weights are on the normalised scale."""

  means: np.ndarray  # (2,), ascending
  variances: np.ndarray  # (2,)
  weights: np.ndarray  # (2,), summing to 1
  offset: float  # minimum of the fitted data
  scale: float  # max - min of the fitted data (1 when constant)


def _as_statistic(x, name):
  x = np.asarray(x, np.float64).ravel()
  if x.size == 0:
    raise ValueError(f"{name}: cannot fit a mixture to an empty array")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: contains NaN or infinity (did training diverge?)")
  return x


def _logsumexp_rows(a):
  peak = a.max(axis=1, keepdims=True)
  return (peak + np.log(np.exp(a - peak).sum(axis=1, keepdims=True)))[:, 0]


def _log_joint(x, means, variances, weights):
  """log(weight_k · N(x_n | mean_k, variance_k)), shape (N, 2)."""
  squared = (x[:, None] - means[None, :]) ** 2
  return np.log(weights) - 0.5 * (np.log(2 * np.pi * variances) + squared / variances)


def _m_step(x, resp, reg):
  counts = resp.sum(axis=0) + _TINY_COUNT
  means = resp.T @ x / counts
  variances = (resp * (x[:, None] - means[None, :]) ** 2).sum(axis=0) / counts + reg
  return means, variances, counts / counts.sum()


def _two_means_labels(x, rng):
  first = x[rng.integers(x.size)]
  spread = (x - first) ** 2
  total = spread.sum()
  second = x[rng.choice(x.size, p=spread / total)] if total > 0 else first
  centres = np.array([first, second])
  labels = np.zeros(x.size, np.int64)
  for _ in range(_MAX_LLOYD_STEPS):
    labels = np.abs(x[:, None] - centres[None, :]).argmin(axis=1)
    updated = np.array(
      [x[labels == k].mean() if np.any(labels == k) else centres[k] for k in range(2)]
    )
    if np.array_equal(updated, centres):
      break
    centres = updated
  return labels


def _initial_params(normalised, seed, reg):
  """Means, variances and weights of the M-step on the hard 2-means split."""
  labels = _two_means_labels(normalised, np.random.default_rng(seed))
  return _m_step(normalised, np.eye(2)[labels], reg)


def fit_gmm_1d(x, *, iters=10, tol=1e-2, reg=5e-4, seed=0):
  """Fits 2 Gaussians to the min-max normalised values of `x` by EM."""
  x = _as_statistic(x, "fit_gmm_1d input")
  offset = float(x.min())
  span = float(x.max()) - offset
  scale = span if span > 0 else 1.0
  normalised = (x - offset) / scale
  params = _initial_params(normalised, seed, reg)
  previous = -np.inf
  for _ in range(iters):
    log_joint = _log_joint(normalised, *params)
    log_norm = _logsumexp_rows(log_joint)
    params = _m_step(normalised, np.exp(log_joint - log_norm[:, None]), reg)
    mean_log_likelihood = log_norm.mean()
    if abs(mean_log_likelihood - previous) < tol:
      break
    previous = mean_log_likelihood
  order = np.argsort(params[0], kind="stable")
  means, variances, weights = (p[order] for p in params)
  return GMM1D(means, variances, weights, offset, scale)


def clean_posterior(gmm, x):
  """Posterior probability of the low-mean component for each value, shape (N,)."""
  normalised = (np.asarray(x, np.float64).ravel() - gmm.offset) / gmm.scale
  log_joint = _log_joint(normalised, gmm.means, gmm.variances, gmm.weights)
  return np.exp(log_joint[:, 0] - _logsumexp_rows(log_joint))


def gmm_clean_mask(ce, energy, *, iters=10, tol=1e-2, reg=5e-4, min_noisy=0.01, seed=0):
  """Clean iff the low-mean posterior exceeds 0.5 for both statistics, (N,) bool.

  When nothing comes out noisy, the `min_noisy` fraction (at least one pair) with
  the lowest joint clean posterior (the product of the two) is forced noisy, so
  a mixture that collapsed onto one mode cannot declare the whole set clean.
  """
  ce = _as_statistic(ce, "ce")
  energy = _as_statistic(energy, "energy")
  if ce.shape != energy.shape:
    raise ValueError(f"ce has {ce.size} values but energy has {energy.size}")
  fit = dict(iters=iters, tol=tol, reg=reg, seed=seed)
  posterior_ce = clean_posterior(fit_gmm_1d(ce, **fit), ce)
  posterior_energy = clean_posterior(fit_gmm_1d(energy, **fit), energy)
  clean = (posterior_ce > 0.5) & (posterior_energy > 0.5)
  if clean.all() and min_noisy > 0:
    forced = min(clean.size, max(1, int(min_noisy * clean.size)))
    least_clean = np.argsort(posterior_ce * posterior_energy, kind="stable")[:forced]
    clean[least_clean] = False
  return clean
