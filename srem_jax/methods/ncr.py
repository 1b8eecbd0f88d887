"""NCR (Huang et al., NeurIPS 2021) as pure functions: its losses, label
refinement and co-division (docs/ncr.md §The algorithm).

`S` is a (K, K) batch similarity matrix, `S[i, j] = s(image_i, caption_j)`,
the given pairs on the diagonal. Per anchor the triplet costs are
`c_s[i, j] = [m + S_ij - S_ii]₊` (row i: caption retrieval) and
`c_im[i, j] = [m + S_ij - S_jj]₊` (column j: image retrieval), diagonals
zeroed. The shapes follow NCR's public code, which the published numbers
come from: a labelled batch's target is the K×K matrix
`T[i, j] = prob_i + (1 - prob_i) · p_self[j]` (its (K, 1) `prob` times a (K,)
prediction), so each pair (i, j) gets its own margin, and an unlabelled
batch's target is one margin per row i, used by both directions.

    loss = warmup_loss(S, margin=0.2)
    p = predict(S, margin=0.2)                       # (K,) in [0, 1]
    loss = labelled_loss(S, prob, p, margin=0.2)     # prob: (K,) GMM posteriors
    prob = clean_probability(per_sample_losses)      # NumPy, whole training set
    labelled = split_labelled(prob, threshold=0.5)
"""

import jax
import jax.numpy as jnp
import numpy as np

from srem_jax.methods import gmm

NAME = "ncr"
SOFT_MARGINS = ("exponential", "linear", "sin")


def _costs(S, margin):
  """`(c_s, c_im)` with their diagonals zeroed; `margin` broadcasts to (K, K)."""
  positive = jnp.diagonal(S)
  off_diagonal = ~jnp.eye(S.shape[0], dtype=bool)
  c_s = jnp.maximum(margin + S - positive[:, None], 0.0)
  c_im = jnp.maximum(margin + S - positive[None, :], 0.0)
  return jnp.where(off_diagonal, c_s, 0.0), jnp.where(off_diagonal, c_im, 0.0)


def warmup_loss(S, margin=0.2):
  """Mean-negative triplet on every pair: `Σ_i mean_j c_s + Σ_j mean_i c_im`.

  The means are over all K entries, the zeroed diagonal included, as NCR's.
  """
  c_s, c_im = _costs(S, margin)
  return jnp.sum(jnp.mean(c_s, axis=1)) + jnp.sum(jnp.mean(c_im, axis=0))


def per_sample_loss(S, margin=0.2, valid=None):
  """Each pair's `mean_j c_s[i, ·] + mean_i c_im[·, i]`, shape (K,): the
  statistic NCR divides the training set by.

  `valid` ((K,) bool) removes padded pairs: they leave every mean (which
  then runs over the valid pairs only) and their own entries are 0.
  """
  c_s, c_im = _costs(S, margin)
  if valid is None:
    return jnp.mean(c_s, axis=1) + jnp.mean(c_im, axis=0)
  count = jnp.maximum(jnp.sum(valid), 1).astype(S.dtype)
  c_s = jnp.where(valid[None, :], c_s, 0.0)
  c_im = jnp.where(valid[:, None], c_im, 0.0)
  loss = (jnp.sum(c_s, axis=1) + jnp.sum(c_im, axis=0)) / count
  return jnp.where(valid, loss, 0.0)


def predict(S, margin=0.2):
  """NCR's correspondence prediction of each pair, (K,) in [0, 1], no gradient.

  `p = m - (mean_j c_s + mean_i c_im) / 2` clamped to [0, m], divided by the
  mean of its `K // 10 + 1` largest values, clamped to [0, 1]. When those
  largest values are all 0 (no pair beats its negatives by anything) every
  prediction is 0; NCR's code divides by zero there.
  """
  S = jax.lax.stop_gradient(S)
  K = S.shape[0]
  c_s, c_im = _costs(S, margin)
  p = jnp.clip(
    margin - 0.5 * (jnp.mean(c_s, axis=1) + jnp.mean(c_im, axis=0)), 0.0, margin
  )
  top = jnp.mean(jnp.sort(p)[K - (K // 10 + 1) :])
  scaled = jnp.where(top > 0, p / jnp.where(top > 0, top, 1.0), 0.0)
  return jnp.clip(scaled, 0.0, 1.0)


def soft_margin(target, margin=0.2, kind="exponential"):
  """`m · s(target)`: s(y) = (10^y - 1)/9, y, or sin(πy - π/2)/2 + 1/2."""
  if kind == "exponential":
    s = (jnp.power(10.0, target) - 1.0) / 9.0
  elif kind == "linear":
    s = target
  elif kind == "sin":
    s = jnp.sin(jnp.pi * target - jnp.pi / 2) / 2 + 0.5
  else:
    raise ValueError(f"kind must be one of {SOFT_MARGINS}, got {kind!r}")
  return margin * s


def _hardest(S, margins):
  c_s, c_im = _costs(S, margins)
  return jnp.sum(jnp.max(c_s, axis=1)) + jnp.sum(jnp.max(c_im, axis=0))


def labelled_target(prob, p_self):
  """The K×K target `T[i, j] = prob_i + (1 - prob_i) · p_self[j]` (label 1)."""
  prob = prob[:, None]
  return jax.lax.stop_gradient(prob + (1.0 - prob) * p_self[None, :])


def labelled_loss(S, prob, p_self, margin=0.2, kind="exponential"):
  """Hardest-negative triplet, summed, with pair (i, j) at margin
  `soft_margin(T[i, j])` (`labelled_target`) in both directions."""
  return _hardest(S, soft_margin(labelled_target(prob, p_self), margin, kind))


def unlabelled_loss(S, target, margin=0.2, kind="exponential"):
  """Hardest-negative triplet, summed, with row i at margin
  `soft_margin(target_i)` in both directions; `target` is (K,)."""
  target = jax.lax.stop_gradient(target)
  return _hardest(S, soft_margin(target, margin, kind)[:, None])


# ---- co-division over the whole training set (NumPy, once per epoch) --------


def clean_probability(losses, *, iters=10, tol=1e-2, reg=5e-4, seed=0) -> np.ndarray:
  """Posterior of the low-mean component of a 2-Gaussian mixture fitted to the
  min-max normalised per-sample losses (`gmm.fit_gmm_1d`), shape (N,)."""
  fit = gmm.fit_gmm_1d(losses, iters=iters, tol=tol, reg=reg, seed=seed)
  return gmm.clean_posterior(fit, losses)


def split_labelled(prob, threshold=0.5) -> np.ndarray:
  """Labelled iff `prob > threshold`, (N,) bool. When every probability
  exceeds the threshold, it moves to the `N // 100`-th smallest one, so about
  1% (at least the smallest) become unlabelled."""
  prob = np.asarray(prob)
  if prob.min() > threshold:
    threshold = np.sort(prob)[len(prob) // 100]
  return prob > threshold


# ---- batch orders: functions of (seed, epoch, model) and the division -------


def _rng(seed, *keys) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def warmup_order(seed: int, epoch: int, member: int, n: int) -> np.ndarray:
  """A model's order of every caption in a warm-up epoch."""
  return _rng(seed, epoch, member, 0).permutation(n)


def cycled_order(index, rows: int, seed: int, *keys) -> np.ndarray:
  """`rows` entries of `index`: reshuffles of it one after another, as NCR's
  loaders restart when they run out (empty when `index` is)."""
  index = np.asarray(index, np.int64)
  if index.size == 0 or rows <= 0:
    return index[:0]
  cycles = -(-rows // index.size)
  shuffles = [
    index[_rng(seed, *keys, c).permutation(index.size)] for c in range(cycles)
  ]
  return np.concatenate(shuffles)[:rows]


def phase_steps(n_labelled: int, batch_size: int, cap: int = 0) -> int:
  """Steps of a model's co-training pass: one per (possibly partial) batch of
  its labelled set, as NCR's loader gives, capped by `cap` when > 0."""
  steps = -(-n_labelled // batch_size)
  return min(steps, cap) if cap else steps


def co_train_orders(seed, epoch, member, labelled, batch_size, cap=0):
  """(steps, labelled order, unlabelled order) of a model's co-training pass;
  a last partial labelled batch is filled from a reshuffle of the set."""
  steps = phase_steps(int(np.sum(labelled)), batch_size, cap)
  rows = steps * batch_size
  order_l = cycled_order(np.flatnonzero(labelled), rows, seed, epoch, member, 1)
  order_u = cycled_order(np.flatnonzero(~labelled), rows, seed, epoch, member, 2)
  return steps, order_l, order_u
