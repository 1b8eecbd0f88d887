"""Tests for srem_jax.methods.gmm: parameter recovery, posteriors, the forced-noisy rule."""

import numpy as np
import pytest

from srem_jax.methods import gmm


def two_clusters(seed=0, n_low=600, n_high=400, std_low=0.5, std_high=1.0):
  rng = np.random.default_rng(seed)
  x = np.concatenate(
    [rng.normal(0.0, std_low, n_low), rng.normal(10.0, std_high, n_high)]
  )
  truth_low = np.arange(x.size) < n_low
  order = rng.permutation(x.size)
  return x[order], truth_low[order]


def in_original_units(fit):
  means = fit.offset + fit.scale * fit.means
  stds = np.sqrt(fit.variances) * fit.scale
  return means, stds


def test_recovers_two_well_separated_gaussians():
  x, truth_low = two_clusters()
  fit = gmm.fit_gmm_1d(x, iters=100, tol=1e-10, reg=1e-10)
  means, stds = in_original_units(fit)
  np.testing.assert_allclose(means, [0.0, 10.0], atol=0.15)
  np.testing.assert_allclose(stds, [0.5, 1.0], rtol=0.1)
  np.testing.assert_allclose(fit.weights, [0.6, 0.4], atol=0.01)
  assert fit.weights.sum() == pytest.approx(1.0)
  # The same data with the paper's 10 iterations / tol 1e-2 agrees on the split.
  default = gmm.fit_gmm_1d(x)
  np.testing.assert_array_equal(gmm.clean_posterior(default, x) > 0.5, truth_low)


def test_fit_uses_min_max_normalisation():
  x, _ = two_clusters(seed=1)
  fit = gmm.fit_gmm_1d(x)
  assert fit.offset == x.min()
  assert fit.scale == pytest.approx(x.max() - x.min())
  shifted = gmm.fit_gmm_1d(3.0 * x + 7.0)
  np.testing.assert_allclose(shifted.means, fit.means, atol=1e-9)
  np.testing.assert_allclose(shifted.variances, fit.variances, atol=1e-9)


def test_posterior_is_bayes_rule_for_the_low_mean_component():
  x, _ = two_clusters(seed=2, std_high=0.5)
  fit = gmm.fit_gmm_1d(x)
  assert fit.means[0] < fit.means[1]
  probe = np.linspace(x.min(), x.max(), 41)
  z = (probe - fit.offset) / fit.scale
  densities = [
    w * np.exp(-((z - m) ** 2) / (2 * v)) / np.sqrt(2 * np.pi * v)
    for m, v, w in zip(fit.means, fit.variances, fit.weights)
  ]
  expected = densities[0] / (densities[0] + densities[1])
  posterior = gmm.clean_posterior(fit, probe)
  np.testing.assert_allclose(posterior, expected, rtol=1e-9, atol=1e-12)
  # Equal spreads: the low-mean posterior falls monotonically with the value.
  assert np.all(np.diff(posterior) <= 0)
  assert posterior[0] > 0.99 and posterior[-1] < 0.01


def test_reg_is_a_variance_floor():
  fit = gmm.fit_gmm_1d(np.full(50, 3.0), reg=5e-4)
  np.testing.assert_allclose(fit.variances, [5e-4, 5e-4])
  assert np.all(np.isfinite(fit.means))


def test_clean_mask_needs_both_statistics():
  ce, low_ce = two_clusters(seed=3, n_low=200, n_high=100)
  rng = np.random.default_rng(4)
  energy = np.where(low_ce, rng.normal(-5, 0.3, ce.size), rng.normal(-1, 0.3, ce.size))
  np.testing.assert_array_equal(gmm.gmm_clean_mask(ce, energy), low_ce)
  # A pair the energy calls noisy stays noisy even when its loss looks clean.
  energy[np.flatnonzero(low_ce)[:7]] = -1.0
  clean = gmm.gmm_clean_mask(ce, energy)
  assert not clean[np.flatnonzero(low_ce)[:7]].any()
  assert clean.sum() == low_ce.sum() - 7


def test_forced_noisy_when_nothing_is_flagged():
  # Constant statistics leave one component empty, so every pair looks clean.
  ce = np.full(300, 0.4)
  energy = np.full(300, -2.0)
  clean = gmm.gmm_clean_mask(ce, energy)
  assert (~clean).sum() == 3  # 1% of 300
  assert (~gmm.gmm_clean_mask(ce[:20], energy[:20])).sum() == 1  # at least one
  assert gmm.gmm_clean_mask(ce, energy, min_noisy=0.0).all()
  assert (~gmm.gmm_clean_mask(ce, energy, min_noisy=0.1)).sum() == 30


def test_forced_noisy_pairs_are_the_least_probably_clean(monkeypatch):
  # Posteriors all above 0.5 but different, so the ranking rule is what decides.
  monkeypatch.setattr(gmm, "clean_posterior", lambda fit, x: 0.55 + 0.4 * x / x.max())
  rng = np.random.default_rng(7)
  ce, energy = rng.uniform(0.1, 1.0, 200), rng.uniform(0.1, 1.0, 200)
  forced = ~gmm.gmm_clean_mask(ce, energy)
  joint = (0.55 + 0.4 * ce / ce.max()) * (0.55 + 0.4 * energy / energy.max())
  np.testing.assert_array_equal(np.flatnonzero(forced), np.sort(np.argsort(joint)[:2]))


def test_deterministic():
  x, _ = two_clusters(seed=6)
  first = gmm.fit_gmm_1d(x, seed=3)
  second = gmm.fit_gmm_1d(x, seed=3)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  ce, energy = x, -x
  np.testing.assert_array_equal(
    gmm.gmm_clean_mask(ce, energy), gmm.gmm_clean_mask(ce, energy)
  )


def test_rejects_empty_and_non_finite_input():
  with pytest.raises(ValueError, match="empty"):
    gmm.fit_gmm_1d(np.array([]))
  with pytest.raises(ValueError, match="NaN"):
    gmm.gmm_clean_mask(np.array([0.1, np.nan]), np.array([0.1, 0.2]))
  with pytest.raises(ValueError, match="energy has"):
    gmm.gmm_clean_mask(np.zeros(3), np.zeros(4))


# ---- against scikit-learn's GaussianMixture, as NCR configures it ------------
def _losses():
  """Loss-like inputs: clean/noisy mixtures of several proportions, edge cases."""
  cases = {}
  for seed in range(3):
    rng = np.random.default_rng(seed)
    for noise in (0.0, 0.2, 0.5, 0.8):
      n_noisy = int(noise * 1000)
      clean = rng.gamma(2.0, 0.1, 1000 - n_noisy)  # skewed towards low losses
      noisy = rng.normal(1.0, 0.25, n_noisy)
      cases[f"seed{seed}-noise{noise}"] = rng.permutation(np.r_[clean, noisy])
  rng = np.random.default_rng(10)
  cases["all-equal"] = np.full(50, 0.3)
  cases["two-equal"] = np.full(2, 1.0)
  cases["two-values"] = np.r_[np.full(30, 0.1), np.full(10, 0.9)]
  cases["three-values"] = np.repeat([0.0, 1.0, 2.0], 20)  # middle one equidistant
  cases["high-outlier"] = np.r_[rng.normal(0.0, 1.0, 999), 100.0]
  cases["low-outlier"] = np.r_[-100.0, rng.normal(0.0, 1.0, 499)]
  for n in (2, 3, 5):
    cases[f"n={n}"] = rng.uniform(size=n)
  return cases


LOSSES = _losses()


def min_max(x):
  """NCR's normalisation; a constant input becomes zeros instead of NaN."""
  span = x.max() - x.min()
  return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def sklearn_clean_posterior(z, tol=1e-2, **init):
  mixture = pytest.importorskip("sklearn.mixture")
  reference = mixture.GaussianMixture(
    n_components=2, max_iter=10, tol=tol, reg_covar=5e-4, **init
  ).fit(z[:, None])
  return reference, reference.predict_proba(z[:, None])[:, reference.means_.argmin()]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
# tol=0 runs all 10 iterations, so the iteration cap is compared too.
@pytest.mark.parametrize("tol", [1e-2, 0.0])
@pytest.mark.parametrize("x", LOSSES.values(), ids=LOSSES.keys())
def test_em_equals_sklearn_from_the_same_start(x, tol):
  z = min_max(x)
  fit = gmm.fit_gmm_1d(z, tol=tol)
  means, variances, weights = gmm._initial_params(z, 0, 5e-4)
  reference, expected = sklearn_clean_posterior(
    z,
    tol=tol,
    weights_init=weights,
    means_init=means[:, None],
    precisions_init=1.0 / variances[:, None, None],
  )
  posterior = gmm.clean_posterior(fit, z)
  np.testing.assert_allclose(posterior, expected, rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(posterior > 0.5, expected > 0.5)
  order = np.argsort(reference.means_[:, 0], kind="stable")
  np.testing.assert_allclose(fit.means, reference.means_[order, 0], atol=1e-12)
  np.testing.assert_allclose(
    fit.variances, reference.covariances_[order, 0, 0], rtol=1e-9
  )
  np.testing.assert_allclose(fit.weights, reference.weights_[order], atol=1e-12)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")  # k-means on < 2 distinct values
@pytest.mark.parametrize("x", LOSSES.values(), ids=LOSSES.keys())
def test_default_fit_is_within_sklearn_run_to_run_spread(x):
  # NCR leaves random_state unset, so its k-means start changes from run to run
  # and moves a few boundary points; ours may differ from any one run, but by no
  # more than two of its runs differ from each other.
  z = min_max(x)
  posterior = gmm.clean_posterior(gmm.fit_gmm_1d(z), z)
  runs = [sklearn_clean_posterior(z, random_state=s)[1] for s in range(10)]
  spread = max(np.abs(a - b).max() for a in runs for b in runs)
  split_spread = max(np.sum((a > 0.5) != (b > 0.5)) for a in runs for b in runs)
  assert max(np.abs(posterior - run).max() for run in runs) <= spread + 1e-12
  assert max(np.sum((posterior > 0.5) != (run > 0.5)) for run in runs) <= split_spread
