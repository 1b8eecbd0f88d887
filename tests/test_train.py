"""The sharded update step: same result on 8 devices as on 1, no replicated work."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tiny
from jax.sharding import Mesh

from srem_jax import execution, sharding
from srem_jax.models.sgraf import build_model
from srem_jax.train.step import (
  PAIRS,
  batch_scores,
  init_state,
  make_optimizer,
  make_train_step,
)

K, R, D, L, VOCAB = 16, 4, 12, 7, 30


def batch(seed):
  return tiny.random_batch(
    seed, batch=K, regions=R, features=D, caption_len=L, vocab=VOCAB
  )


def run_steps(mesh, head, name, warmup, steps=2):
  model = build_model(tiny.model_config(head, img_dim=D), VOCAB, execution.resolve())
  # Plain SGD keeps the comparison about the sharded gradient: Adam would turn
  # float noise in exactly-zero gradients (a bias before BatchNorm, SGR's key
  # bias under a softmax) into whole-sized steps.
  tx = optax.sgd(0.05)
  state = init_state(
    model, tx, seed=0, num_regions=R, img_dim=D, caption_len=L, mesh=mesh
  )
  step = make_train_step(
    model, tx, tiny.loss_options(name), mesh, warmup=warmup, external_selection=False
  )
  losses = []
  for i in range(steps):
    state, metrics = step(state, sharding.global_batch(batch(i), mesh))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses


@pytest.mark.parametrize(
  "head, name, warmup",
  [("sgr", "srem", False), ("saf", "srem", True), ("sgr", "ccl", False)],
)
def test_eight_devices_match_one(head, name, warmup):
  assert jax.device_count() == 8
  one = Mesh(np.array(jax.devices()[:1]), ("data",))
  eight = sharding.make_mesh(-1)
  state1, losses1 = run_steps(one, head, name, warmup)
  state8, losses8 = run_steps(eight, head, name, warmup)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(losses1))
  chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(
    state8.batch_stats, state1.batch_stats, rtol=1e-4, atol=1e-6
  )
  assert int(state8.step) == 2


def test_pair_scoring_is_split_across_devices():
  """Each of 8 devices runs about an eighth of the single-device FLOPs.

  XLA's cost analysis counts a loop body once, whatever its trip count, so
  one scan step covers all images in both cases.
  """
  flops = {}
  for n in (1, 8):
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    model = build_model(
      tiny.model_config("sgr", img_dim=D), VOCAB, execution.resolve()
    ).clone(img_chunk=K)
    tx = optax.sgd(0.05)
    state = init_state(
      model, tx, seed=0, num_regions=R, img_dim=D, caption_len=L, mesh=mesh
    )
    inputs = sharding.global_batch(batch(0), mesh)
    scores = jax.jit(
      lambda p, b, mesh=mesh, model=model, state=state: batch_scores(
        model,
        p,
        state.batch_stats,
        b,
        train=False,
        rng=jax.random.PRNGKey(0),
        mesh=mesh,
      )[0]
    )
    cost = scores.lower(state.params, inputs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops[n] = cost["flops"]
  assert flops[8] < 0.25 * flops[1], flops


def reference_pair_values(S, tau, temp):
  """Energy and swapped entropy of SPEC §3 in float64 NumPy."""
  S = np.asarray(S, np.float64)

  def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

  def row_energy(z):
    m = (z / temp).max(axis=1)
    return -temp * (m + np.log(np.exp(z / temp - m[:, None]).sum(axis=1)))

  z_i2t, z_t2i = S / tau, S.T / tau
  log_i2t, log_t2i = log_softmax(z_i2t), log_softmax(z_t2i)
  energy = 0.5 * (row_energy(z_i2t) + row_energy(z_t2i))
  entropy = -0.5 * (
    (np.exp(log_i2t) * log_t2i).sum(axis=1) + (np.exp(log_t2i) * log_i2t).sum(axis=1)
  )
  return energy, entropy


def test_step_returns_each_pairs_energy_entropy_and_truth():
  mesh = sharding.make_mesh(-1)
  model = build_model(tiny.model_config("sgr", img_dim=D), VOCAB, execution.resolve())
  tx = optax.sgd(0.05)
  state = init_state(
    model, tx, seed=0, num_regions=R, img_dim=D, caption_len=L, mesh=mesh
  )
  loss_kw = tiny.loss_options()
  host = batch(3)
  inputs = sharding.global_batch(host, mesh)
  # The step scores the batch with dropout drawn from fold_in(rng, step).
  scores, _ = jax.jit(
    lambda s, b: batch_scores(
      model,
      s.params,
      s.batch_stats,
      b,
      train=True,
      rng=jax.random.fold_in(s.rng, s.step),
      mesh=mesh,
    )
  )(state, inputs)
  energy, entropy = reference_pair_values(
    scores, loss_kw["tau"], loss_kw["energy_temp"]
  )
  step = make_train_step(
    model, tx, loss_kw, mesh, warmup=False, external_selection=False
  )
  _, metrics = step(state, inputs)
  pairs = jax.device_get(metrics[PAIRS])
  chex.assert_shape([pairs["energy"], pairs["entropy"], pairs["truly_clean"]], (K,))
  np.testing.assert_allclose(pairs["energy"], energy, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pairs["entropy"], entropy, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(pairs["truly_clean"], host["truly_clean"])
  assert np.ptp(energy) > 1e-3 and np.ptp(entropy) > 1e-3  # not a constant


def test_learning_rate_steps_down():
  cfg = ml_collections.ConfigDict(
    dict(lr=2e-4, lr_decay_epochs=3, lr_decay_factor=0.1, grad_clip=2.0)
  )
  tx = make_optimizer(cfg, steps_per_epoch=10)
  params = {"w": jnp.ones(())}
  opt_state = tx.init(params)
  sizes = []
  for _ in range(31):
    updates, opt_state = tx.update({"w": jnp.ones(())}, opt_state, params)
    sizes.append(abs(float(updates["w"])))
  # Adam's first steps have |update| ≈ lr; after 30 steps the LR is 10x lower.
  np.testing.assert_allclose(sizes[0], 2e-4, rtol=1e-3)
  np.testing.assert_allclose(sizes[30], 2e-5, rtol=1e-2)
