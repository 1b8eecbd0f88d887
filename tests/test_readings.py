"""Tests for the readings of SREM (srem_jax/methods/readings.py) and the loss pieces
only they use, against float64 NumPy references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import (
  SIZES,
  TAU,
  assert_close,
  random_sims,
  ref_complementary,
  ref_entropy_weight,
  ref_softmax_rows,
  ref_swapped_entropy,
  ref_triplet,
)

from configs import base
from srem_jax import config_checks
from srem_jax.errors import UserError
from srem_jax.methods import losses, readings
from srem_jax.train import step

# ---- the readings' pieces (srem_jax/methods/readings.py) ---------------------------


def ref_classification(S, tau, weights=None):
  K = len(S)
  weights = np.ones(K) if weights is None else weights
  p_i2t, p_t2i = ref_softmax_rows(S / tau), ref_softmax_rows(S.T / tau)
  return sum(
    weights[i] * -0.5 * (np.log(p_i2t[i, i]) + np.log(p_t2i[i, i])) for i in range(K)
  )


def ref_triplet_margins(S, margins, weights):
  """Hardest-negative triplet with anchor i's hinges at margin margins[i]."""
  K = len(S)
  total = 0.0
  for i in range(K):
    others = [j for j in range(K) if j != i]
    if not others:
      continue
    row = max(max(0, margins[i] - S[i, i] + S[i, j]) for j in others)
    col = max(max(0, margins[i] - S[i, i] + S[j, i]) for j in others)
    total += weights[i] * (row + col)
  return total


@pytest.mark.parametrize("K", SIZES)
def test_classification_loss_matches_reference(K):
  S = random_sims(K, seed=31)
  weights = np.linspace(0.2, 1.0, K)
  loss, aux = jax.jit(losses.classification_loss, static_argnums=1)(
    jnp.asarray(S), TAU, jnp.asarray(weights)
  )
  assert_close(loss, ref_classification(S, TAU, weights))
  assert_close(float(np.sum(aux["per_anchor"])), ref_classification(S, TAU))


@pytest.mark.parametrize("K", SIZES)
def test_per_anchor_margins_match_reference(K):
  S = random_sims(K, seed=32)
  margins = np.linspace(0.0, 0.3, K)
  weights = np.linspace(1.0, 0.5, K)
  loss, _ = losses.triplet_hardest(
    jnp.asarray(S), jnp.asarray(margins, jnp.float32), jnp.asarray(weights)
  )
  assert_close(loss, ref_triplet_margins(S, margins, weights))
  # Equal margins are the scalar margin.
  same, _ = losses.triplet_hardest(jnp.asarray(S), jnp.full((K,), 0.2))
  assert_close(same, ref_triplet(S, 0.2))


@pytest.mark.parametrize("weight", [1.0, 0.1])
@pytest.mark.parametrize("kind", losses.WARMUPS)
def test_warmup_losses_match_reference(kind, weight):
  S = random_sims(8, seed=33)
  loss, aux = losses.objective(
    jnp.asarray(S), warmup=True, warmup_loss_kind=kind, warmup_triplet_weight=weight
  )
  triplet = ref_triplet(S, 0.2, negatives="mean") if "triplet" in kind else 0.0
  if "anchor" in kind:
    triplet /= len(S)
  triplet *= weight
  ccl = ref_complementary(S, TAU, 0.0, "cross_modal", 1e-6) if "ccl" in kind else 0.0
  assert_close(loss, triplet + ccl)
  assert_close(aux["loss_clean"], triplet)
  assert_close(aux["loss_cmbcl"], ccl)
  np.testing.assert_array_equal(aux["clean"], np.ones(8, bool))
  # The baselines ignore the warm-up switch.
  for name in ("ccl", "triplet_hardest"):
    plain, _ = losses.objective(jnp.asarray(S), name=name)
    warm, _ = losses.objective(
      jnp.asarray(S), name=name, warmup=True, warmup_loss_kind=kind
    )
    assert float(warm) == float(plain)


@pytest.mark.parametrize("entropy_use", losses.ENTROPY_USES)
@pytest.mark.parametrize("clean_loss", losses.CLEAN_LOSSES)
def test_selected_loss_readings_match_reference(entropy_use, clean_loss):
  if entropy_use == "margin" and clean_loss == "ce":
    with pytest.raises(ValueError, match="margin"):
      losses.objective(
        jnp.asarray(random_sims(4)), clean_loss="ce", entropy_use="margin"
      )
    return
  S = random_sims(8, seed=34)
  given = np.array([1, 0, 1, 1, 0, 1, 1, 0], bool)
  certainty = ref_entropy_weight(ref_swapped_entropy(S, TAU), 8)
  weights, margins = given * certainty, np.full(8, 0.2)
  if entropy_use == "inverse":
    weights = given * (1 - certainty)
  elif entropy_use == "margin":
    weights, margins = given * 1.0, 0.2 * certainty
  if clean_loss == "ce":
    expected = ref_classification(S, TAU, weights)
  else:
    expected = ref_triplet_margins(S, margins, weights)
  cmbcl = ref_complementary(S, TAU, 0.5, "cross_modal", 1e-6)
  for reduction, scale in (("sum", 1.0), ("mean", 1.0 / given.sum())):
    loss, aux = jax.jit(
      functools.partial(
        losses.objective,
        clean_loss=clean_loss,
        entropy_use=entropy_use,
        clean_reduction=reduction,
      )
    )(jnp.asarray(S), clean=jnp.asarray(given))
    assert_close(aux["loss_clean"], expected * scale)
    assert_close(loss, expected * scale + cmbcl)
  # Without the entropy: unit weights and the plain margin.
  loss, aux = losses.objective(
    jnp.asarray(S),
    clean=jnp.asarray(given),
    clean_loss=clean_loss,
    entropy_use=entropy_use,
    use_entropy_weight=False,
    use_cmbcl=False,
  )
  plain = (
    ref_classification(S, TAU, given * 1.0)
    if clean_loss == "ce"
    else ref_triplet(S, 0.2, given * 1.0)
  )
  assert_close(loss, plain)


@pytest.mark.parametrize("reading", sorted(readings.READINGS))
def test_every_reading_is_a_valid_config_and_trains(reading):
  cfg = base.get_config().loss
  cfg.reading = reading
  config_checks.validate_loss(cfg)
  resolved = readings.resolve(cfg)
  assert resolved == {readings.TRIPLET_WEIGHT: 1.0, **readings.READINGS[reading]}
  # One component overridden; the rest still come from the reading.
  cfg.clean_reduction = "sum" if resolved["clean_reduction"] == "mean" else "mean"
  changed = readings.resolve(cfg)
  assert changed["clean_reduction"] == cfg.clean_reduction
  assert {k: v for k, v in changed.items() if k != "clean_reduction"} == {
    k: v for k, v in resolved.items() if k != "clean_reduction"
  }
  # Its objective has finite gradients in both phases.
  options = step.loss_options(cfg)
  S = jnp.asarray(random_sims(8, seed=35))
  for warmup in (True, False):
    grad = jax.grad(lambda s: losses.objective(s, warmup=warmup, **options)[0])(S)
    chex.assert_tree_all_finite(grad)


@pytest.mark.parametrize(
  "field,value",
  [("reading", "r10"), ("warmup", "mean"), ("clean_loss", "nce"), ("entropy_use", "w")],
)
def test_bad_reading_config_names_the_field(field, value):
  cfg = base.get_config().loss.to_dict()
  cfg[field] = value
  with pytest.raises(UserError, match=rf"^loss\.{field}: expected one of"):
    config_checks.validate_loss(cfg)


def test_triplet_weight_comes_from_the_reading_unless_set():
  cfg = base.get_config().loss
  cfg.reading = "r8"
  assert readings.resolve(cfg)[readings.TRIPLET_WEIGHT] == 0.1
  assert step.loss_options(cfg)["warmup_triplet_weight"] == 0.1
  cfg.warmup_triplet_weight = 0.5
  assert readings.resolve(cfg)[readings.TRIPLET_WEIGHT] == 0.5
  cfg.warmup_triplet_weight = 0.0  # zero is a weight, not "the reading's"
  assert readings.resolve(cfg)[readings.TRIPLET_WEIGHT] == 0.0
  for bad in (-0.5, float("nan"), "0.1"):
    given = {**cfg.to_dict(), "warmup_triplet_weight": bad}
    with pytest.raises(UserError, match=r"^loss\.warmup_triplet_weight: expected"):
      config_checks.validate_loss(given)


def test_margin_entropy_needs_the_triplet():
  cfg = base.get_config().loss.to_dict()
  cfg.update(clean_loss="ce", entropy_use="margin")
  with pytest.raises(UserError, match=r"^loss\.entropy_use: 'margin'"):
    config_checks.validate_loss(cfg)
