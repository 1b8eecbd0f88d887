"""Tests for srem_jax.methods.losses against float64 NumPy re-implementations of SPEC §3."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from configs import base
from srem_jax import config_checks
from srem_jax.errors import UserError
from srem_jax.methods import losses

TAU = 0.05
SIZES = (8, 1, 2)


def random_sims(K, seed=0):
  rng = np.random.default_rng(seed)
  sims = rng.uniform(0.05, 0.6, size=(K, K))
  sims[np.arange(K), np.arange(K)] = rng.uniform(0.4, 0.95, size=K)
  return sims


# ---- float64 NumPy references, written from SPEC §3 loop by loop -----------


def ref_softmax_rows(z):
  out = np.empty_like(z)
  for i, row in enumerate(z):
    e = np.exp(row - row.max())
    out[i] = e / e.sum()
  return out


def ref_energy(z, temp):
  return np.array([-temp * np.log(np.sum(np.exp(row / temp))) for row in z])


def ref_sample_energy(S, tau, temp=1.0):
  return 0.5 * (ref_energy(S / tau, temp) + ref_energy(S.T / tau, temp))


def ref_swapped_entropy(S, tau):
  p_i2t, p_t2i = ref_softmax_rows(S / tau), ref_softmax_rows(S.T / tau)
  K = len(S)
  out = np.zeros(K)
  for i in range(K):
    for j in range(K):
      out[i] -= 0.5 * p_i2t[i, j] * np.log(p_t2i[i, j])
      out[i] -= 0.5 * p_t2i[i, j] * np.log(p_i2t[i, j])
  return out


def ref_entropy_weight(H, K):
  if K == 1:
    return np.ones_like(H)
  return np.clip(1 - H / np.log(K), 0, 1)


def ref_clean_mask(S, tau, temp=1.0, quantile=0.5):
  e = ref_sample_energy(S, tau, temp)
  threshold = np.quantile(e, quantile)
  return np.array(
    [
      np.argmax(S[i]) == i and np.argmax(S[:, i]) == i and e[i] <= threshold
      for i in range(len(S))
    ]
  )


def ref_triplet(S, margin, weights=None, negatives="hardest"):
  K = len(S)
  weights = np.ones(K) if weights is None else weights
  total = 0.0
  for i in range(K):
    others = [j for j in range(K) if j != i]
    if not others:
      continue
    caption_hinges = [max(0, margin - S[i, i] + S[i, j]) for j in others]
    image_hinges = [max(0, margin - S[i, i] + S[j, i]) for j in others]
    if negatives == "hardest":
      cost = max(caption_hinges) + max(image_hinges)
    else:
      cost = (sum(caption_hinges) + sum(image_hinges)) / len(others)
    total += weights[i] * cost
  return total


def ref_complementary(S, tau, beta, bias, eps):
  K = len(S)
  p_i2t, p_t2i = ref_softmax_rows(S / tau), ref_softmax_rows(S.T / tau)
  total = 0.0
  for p_same, p_other in ((p_i2t, p_t2i), (p_t2i, p_i2t)):
    per_anchor = []
    for i in range(K):
      negatives = [j for j in range(K) if j != i]
      if not negatives:
        per_anchor.append(0.0)
        continue
      if bias == "cross_modal":
        b = np.array([p_other[j, i] for j in negatives])
      else:
        b = np.array([p_same[i, j] for j in negatives])
      q = (1 - beta) / len(negatives) + beta * b / b.sum()
      per_anchor.append(
        sum(qn * -np.log(1 - p_same[i, j] + eps) for qn, j in zip(q, negatives))
      )
    total += np.mean(per_anchor)
  return total


def ref_per_sample_stats(S, tau, temp=1.0):
  p_i2t, p_t2i = ref_softmax_rows(S / tau), ref_softmax_rows(S.T / tau)
  ce = -0.5 * (np.log(np.diag(p_i2t)) + np.log(np.diag(p_t2i)))
  return {
    "ce": ce,
    "energy": ref_sample_energy(S, tau, temp),
    "entropy": ref_swapped_entropy(S, tau),
  }


def assert_close(actual, expected, atol=1e-4):
  np.testing.assert_allclose(
    np.asarray(actual, np.float64), expected, rtol=1e-4, atol=atol
  )


# ---- functions vs references, jitted and not ------------------------------


class LossesVsReference(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SIZES)
  def test_logits_energy_entropy(self, K):
    S = random_sims(K)
    z_i2t, z_t2i = self.variant(losses.batch_logits)(jnp.asarray(S), TAU)
    assert_close(z_i2t, S / TAU)
    assert_close(z_t2i, S.T / TAU)
    for temp in (1.0, 0.5):
      energy = self.variant(losses.energy)(jnp.asarray(S / TAU), temp)
      assert_close(energy, ref_energy(S / TAU, temp))
      pair_energy = self.variant(losses.sample_energy)(jnp.asarray(S), TAU, temp)
      chex.assert_shape(pair_energy, (K,))
      assert_close(pair_energy, ref_sample_energy(S, TAU, temp))
    entropy = self.variant(losses.swapped_entropy)(jnp.asarray(S), TAU)
    assert_close(entropy, ref_swapped_entropy(S, TAU))
    weight = self.variant(losses.entropy_weight, static_argnums=1)(entropy, K)
    assert_close(weight, ref_entropy_weight(ref_swapped_entropy(S, TAU), K))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SIZES)
  def test_batch_clean_mask(self, K):
    S = random_sims(K, seed=1)
    for quantile in (0.5, 1.0):
      mask = self.variant(losses.batch_clean_mask)(jnp.asarray(S), TAU, 1.0, quantile)
      chex.assert_type(mask, bool)
      np.testing.assert_array_equal(mask, ref_clean_mask(S, TAU, 1.0, quantile))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SIZES)
  def test_triplet_hardest(self, K):
    S = random_sims(K, seed=2)
    weights = np.random.default_rng(3).uniform(0, 1, K)
    loss, aux = self.variant(losses.triplet_hardest)(jnp.asarray(S), 0.2)
    assert_close(loss, ref_triplet(S, 0.2))
    chex.assert_shape(aux["per_anchor"], (K,))
    loss, _ = self.variant(losses.triplet_hardest)(
      jnp.asarray(S), 0.2, jnp.asarray(weights)
    )
    assert_close(loss, ref_triplet(S, 0.2, weights))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
    K=SIZES, beta=(0.0, 0.5, 1.0), bias=("cross_modal", "same_modal")
  )
  def test_complementary_loss(self, K, beta, bias):
    S = random_sims(K, seed=4)
    fn = self.variant(functools.partial(losses.complementary_loss, bias=bias))
    loss, aux = fn(jnp.asarray(S), TAU, beta)
    assert_close(loss, ref_complementary(S, TAU, beta, bias, 1e-6))
    for q in (aux["q_i2t"], aux["q_t2i"]):
      chex.assert_shape(q, (K, K))
      assert_close(np.diag(q), np.zeros(K), atol=1e-7)
      assert_close(q.sum(axis=1), np.ones(K) if K > 1 else np.zeros(1), atol=1e-5)
      assert np.all(np.asarray(q) >= 0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SIZES)
  def test_per_sample_stats(self, K):
    S = random_sims(K, seed=5)
    stats = self.variant(losses.per_sample_stats)(jnp.asarray(S), TAU, 0.7)
    expected = ref_per_sample_stats(S, TAU, 0.7)
    assert_close(stats["ce"], expected["ce"])
    assert_close(stats["energy"], expected["energy"])
    assert_close(stats["entropy"], expected["entropy"])


def test_per_sample_stats_valid_mask_equals_unpadded_submatrix():
  S = random_sims(8, seed=6)
  valid = np.array([1, 1, 0, 1, 1, 1, 0, 0], bool)
  padded = S.copy()
  padded[~valid, :] = 0.99  # padding must not leak into any softmax
  padded[:, ~valid] = 0.99
  stats = jax.jit(losses.per_sample_stats)(
    jnp.asarray(padded), TAU, 1.0, jnp.asarray(valid)
  )
  expected = ref_per_sample_stats(S[valid][:, valid], TAU)
  for key in ("ce", "energy", "entropy"):
    assert_close(np.asarray(stats[key])[valid], expected[key])
    np.testing.assert_array_equal(np.asarray(stats[key])[~valid], 0.0)


# ---- properties -------------------------------------------------------------


def test_beta_zero_is_rcl_complementary_contrastive_loss():
  S = random_sims(8, seed=7)
  eps = 1e-6
  expected = 0.0
  for P in (ref_softmax_rows(S / TAU), ref_softmax_rows(S.T / TAU)):
    terms = -np.log(1 - P + eps) / (len(S) - 1)
    np.fill_diagonal(terms, 0.0)
    expected += terms.sum(axis=1).mean()
  loss, _ = losses.complementary_loss(jnp.asarray(S), TAU, beta=0.0, eps=eps)
  assert_close(loss, expected)
  # With beta = 0 the form of B cannot matter.
  same, _ = losses.complementary_loss(jnp.asarray(S), TAU, 0.0, "same_modal", eps)
  assert_close(same, expected)


def test_cross_modal_bias_points_back_from_the_other_modality():
  S = random_sims(4, seed=8)
  _, aux = losses.complementary_loss(jnp.asarray(S), TAU, beta=1.0)
  p_t2i = ref_softmax_rows(S.T / TAU)
  expected = p_t2i.T * (1 - np.eye(4))
  expected /= expected.sum(axis=1, keepdims=True)
  assert_close(aux["q_i2t"], expected, atol=1e-6)


def test_permuting_the_batch_permutes_per_sample_outputs():
  S = random_sims(8, seed=9)
  perm = np.random.default_rng(0).permutation(8)
  _, aux = losses.objective(jnp.asarray(S), clean_quantile=0.75)
  _, aux_perm = losses.objective(jnp.asarray(S[perm][:, perm]), clean_quantile=0.75)
  for key in ("clean", "energy", "entropy", "weight"):
    np.testing.assert_allclose(aux_perm[key], np.asarray(aux[key])[perm], rtol=1e-5)
  for key in ("loss", "loss_clean", "loss_cmbcl", "clean_frac"):
    assert_close(aux_perm[key], float(aux[key]), atol=1e-5)


def test_perfectly_matched_batch_has_zero_triplet_loss():
  S = np.eye(6) * (1 - 1e-3)
  loss, aux = losses.triplet_hardest(jnp.asarray(S), margin=0.2)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(aux["per_anchor"], 0.0)


def test_zero_weight_excludes_anchor():
  S = random_sims(5, seed=10)
  weights = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
  loss, aux = losses.triplet_hardest(jnp.asarray(S), 0.2, jnp.asarray(weights))
  assert_close(loss, float(np.sum(np.asarray(aux["per_anchor"])[[0, 2, 4]])))


def test_entropy_weight_range_and_no_gradient():
  H = jnp.linspace(-1.0, 5.0, 13)
  w = losses.entropy_weight(H, 8)
  assert np.all((np.asarray(w) >= 0) & (np.asarray(w) <= 1))
  assert_close(w, np.clip(1 - np.asarray(H) / np.log(8), 0, 1))
  grad = jax.grad(lambda h: losses.entropy_weight(h, 8).sum())(H)
  np.testing.assert_array_equal(grad, 0.0)


def test_batch_clean_mask_flags_planted_mismatches():
  rng = np.random.default_rng(11)
  S = rng.uniform(0.1, 0.3, size=(8, 8))
  np.fill_diagonal(S, rng.uniform(0.85, 0.95, size=8))
  # Pairs 1 and 4 were given each other's partners; pair 6 got an unrelated one.
  S[1, 1], S[4, 4], S[1, 4], S[4, 1] = 0.2, 0.25, 0.9, 0.92
  S[6, 6] = 0.15
  planted = [1, 4, 6]
  mask = np.asarray(losses.batch_clean_mask(jnp.asarray(S), TAU, quantile=1.0))
  assert not mask[planted].any()
  assert mask[[0, 2, 3, 5, 7]].all()
  assert not np.asarray(losses.batch_clean_mask(jnp.asarray(S), TAU))[planted].any()


@pytest.mark.parametrize("K", SIZES)
@pytest.mark.parametrize("name", losses.LOSS_NAMES)
@pytest.mark.parametrize("warmup", (False, True))
def test_gradients_are_finite(K, name, warmup):
  S = jnp.asarray(random_sims(K, seed=12), jnp.float32)
  grad = jax.jit(jax.grad(lambda s: losses.objective(s, name=name, warmup=warmup)[0]))(
    S
  )
  chex.assert_shape(grad, (K, K))
  chex.assert_tree_all_finite(grad)


# ---- objective: names and switches -----------------------------------------


def test_srem_objective_matches_reference():
  S = random_sims(8, seed=13)
  loss, aux = jax.jit(losses.objective)(jnp.asarray(S))
  clean = ref_clean_mask(S, TAU)
  weight = ref_entropy_weight(ref_swapped_entropy(S, TAU), 8)
  loss_clean = ref_triplet(S, 0.2, clean * weight)
  loss_cmbcl = ref_complementary(S, TAU, 0.5, "cross_modal", 1e-6)
  assert_close(aux["loss_clean"], loss_clean)
  assert_close(aux["loss_cmbcl"], loss_cmbcl)
  assert_close(loss, loss_clean + loss_cmbcl)
  np.testing.assert_array_equal(aux["clean"], clean)
  assert_close(aux["clean_frac"], clean.mean())
  assert_close(aux["weight"], weight)
  assert_close(aux["energy"], ref_sample_energy(S, TAU))
  assert_close(aux["entropy"], ref_swapped_entropy(S, TAU))


def test_objective_switches():
  S = random_sims(8, seed=14)
  Sj = jnp.asarray(S)
  weight = ref_entropy_weight(ref_swapped_entropy(S, TAU), 8)
  cmbcl = ref_complementary(S, TAU, 0.5, "cross_modal", 1e-6)

  loss, aux = losses.objective(Sj, use_filtration=False)
  assert_close(aux["loss_clean"], ref_triplet(S, 0.2, weight))
  assert aux["clean"].all()
  assert_close(loss, ref_triplet(S, 0.2, weight) + cmbcl)

  loss, _ = losses.objective(Sj, use_filtration=False, use_entropy_weight=False)
  assert_close(loss, ref_triplet(S, 0.2) + cmbcl)

  loss, aux = losses.objective(Sj, use_cmbcl=False, cmbcl_weight=3.0)
  assert float(aux["loss_cmbcl"]) == 0.0
  assert_close(loss, aux["loss_clean"])

  loss, aux = losses.objective(Sj, cmbcl_weight=2.0)
  assert_close(loss, float(aux["loss_clean"]) + 2.0 * cmbcl)

  given = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
  loss, aux = losses.objective(Sj, clean=jnp.asarray(given), use_cmbcl=False)
  np.testing.assert_array_equal(aux["clean"], given)
  assert_close(loss, ref_triplet(S, 0.2, given * weight))

  loss, aux = losses.objective(Sj, clean=jnp.zeros(8, bool), use_cmbcl=False)
  assert float(loss) == 0.0 and float(aux["clean_frac"]) == 0.0

  loss, aux = losses.objective(Sj, bias="same_modal", beta=0.3)
  assert_close(aux["loss_cmbcl"], ref_complementary(S, TAU, 0.3, "same_modal", 1e-6))


def test_warmup_is_unbiased_complementary_loss_on_all_pairs():
  S = random_sims(8, seed=15)
  loss, aux = losses.objective(jnp.asarray(S), warmup=True, beta=0.9)
  assert_close(loss, ref_complementary(S, TAU, 0.0, "cross_modal", 1e-6))
  assert aux["clean"].all() and float(aux["loss_clean"]) == 0.0


def test_baseline_names():
  S = random_sims(8, seed=16)
  Sj = jnp.asarray(S)
  loss, aux = losses.objective(Sj, name="triplet_hardest")
  assert_close(loss, ref_triplet(S, 0.2))
  assert float(aux["loss_cmbcl"]) == 0.0 and aux["clean"].all()
  loss_other, _ = losses.objective(
    Sj, name="triplet_hardest", beta=0.0, use_cmbcl=False
  )
  assert float(loss_other) == float(loss)
  warm, _ = losses.objective(Sj, name="triplet_hardest", warmup=True)
  assert float(warm) == float(loss)

  loss, aux = losses.objective(Sj, name="ccl", beta=0.7)
  assert_close(loss, ref_complementary(S, TAU, 0.0, "cross_modal", 1e-6))
  assert float(aux["loss_clean"]) == 0.0
  for key in ("energy", "entropy", "weight", "clean"):
    chex.assert_shape(aux[key], (8,))

  with pytest.raises(ValueError, match="name"):
    losses.objective(Sj, name="vse")


# ---- config validation -----------------------------------------------------


def test_default_loss_config_is_valid():
  config_checks.validate_loss(base.get_config().loss)


@pytest.mark.parametrize("K", SIZES)
def test_mean_negative_triplet_matches_reference(K):
  S = random_sims(K, seed=21)
  weights = np.linspace(0.0, 1.0, K)
  loss, aux = losses.triplet_hardest(
    jnp.asarray(S), 0.2, jnp.asarray(weights), negatives="mean"
  )
  assert_close(loss, ref_triplet(S, 0.2, weights, "mean"))
  assert_close(float(np.sum(aux["per_anchor"])), ref_triplet(S, 0.2, negatives="mean"))
  # At equal scores every hinge is the margin, as with the hardest negative.
  if K > 1:
    _, flat = losses.triplet_hardest(jnp.full((K, K), 0.5), 0.2, negatives="mean")
    np.testing.assert_allclose(flat["per_anchor"], 0.4, rtol=1e-6)


def test_clean_triplet_switches_in_the_objective():
  S = random_sims(8, seed=22)
  Sj = jnp.asarray(S)
  given = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
  _, aux = losses.objective(Sj, clean=jnp.asarray(given), use_cmbcl=False)
  weight = np.asarray(aux["weight"])
  expected_sum = ref_triplet(S, 0.2, given * weight)

  loss, _ = losses.objective(
    Sj, clean=jnp.asarray(given), use_cmbcl=False, clean_reduction="mean"
  )
  assert_close(loss, expected_sum / given.sum())

  loss, _ = losses.objective(
    Sj, clean=jnp.asarray(given), use_cmbcl=False, clean_negatives="mean"
  )
  assert_close(loss, ref_triplet(S, 0.2, given * weight, "mean"))

  # No selected pair: the mean-reduced clean term is zero, not NaN.
  loss, _ = losses.objective(
    Sj, clean=jnp.zeros(8, bool), use_cmbcl=False, clean_reduction="mean"
  )
  assert float(loss) == 0.0

  # The switches change only SREM's clean term.
  base_loss, _ = losses.objective(Sj, name="triplet_hardest")
  switched, _ = losses.objective(
    Sj, name="triplet_hardest", clean_negatives="mean", clean_reduction="mean"
  )
  assert float(switched) == float(base_loss)


@pytest.mark.parametrize(
  "field,value",
  [
    ("name", "vse"),
    ("clean_negatives", "semi"),
    ("clean_reduction", "max"),
    ("selection", "gmm"),
    ("bias", "other"),
    ("tau", 0.0),
    ("energy_temp", -1.0),
    ("margin", -0.1),
    ("clean_quantile", 0.0),
    ("clean_quantile", 1.5),
    ("beta", 1.2),
    ("cmbcl_weight", -1.0),
    ("eps", 1.0),
    ("gmm_iters", 0),
    ("gmm_reg", 0.0),
    ("gmm_min_noisy", 1.0),
    ("use_cmbcl", "yes"),
    ("tau", float("nan")),
  ],
)
def test_bad_loss_config_names_the_field(field, value):
  cfg = base.get_config().loss.to_dict()
  cfg[field] = value
  with pytest.raises(UserError, match=rf"^loss\.{field}: "):
    config_checks.validate_loss(cfg)


def test_missing_loss_field_is_reported():
  cfg = base.get_config().loss.to_dict()
  del cfg["tau"]
  with pytest.raises(UserError, match=r"^loss\.tau: missing"):
    config_checks.validate_loss(cfg)


def test_complementary_gradient_finite_for_a_certain_batch_without_eps():
  S = jnp.eye(4) * 0.999 + 1e-3  # P_ii rounds to 1 in float32
  for bias in losses.BIASES:
    grad = jax.grad(lambda s: losses.complementary_loss(s, 0.01, 0.5, bias, 0.0)[0])(S)
    chex.assert_tree_all_finite(grad)
