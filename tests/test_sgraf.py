"""SGRAF model: parameter counts, config, jit behaviour and tiled scoring."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from srem_jax import config_checks, execution
from srem_jax.errors import UserError
from srem_jax.models.sgraf import SGRAF, build_model
from srem_jax.models.tiling import score_all


def _reference_param_count(head, vocab=8481, img=2048, e=1024, word=300, sim=256):
  """Trainable tensors of the PyTorch reference, layer by layer."""
  linear = lambda i, o: i * o + o
  gru_direction = 3 * e * (word + e) + 2 * 3 * e
  common = (
    linear(img, e)  # img_enc.fc
    + vocab * word  # txt_enc.embed
    + 2 * gru_direction  # txt_enc.cap_rnn, both directions
    + 2 * linear(e, e) + 2 * 36 + 2 * e + linear(e, 1)  # v_global_w with 2 BNs
    + 2 * linear(e, e) + linear(e, 1)  # t_global_w
    + 2 * linear(e, sim) + linear(sim, 1)  # sim_tranloc_w, sim_tranglo_w, sim_eval_w
  )  # fmt: skip
  if head == "sgr":
    return common + 3 * 3 * linear(sim, sim)
  return common + linear(sim, 1) + 2  # attn_sim_w and the 1-channel BN


@pytest.mark.parametrize("head, millions", [("sgr", 18.1), ("saf", 17.5)])
def test_parameter_count_at_paper_dims(head, millions):
  model = SGRAF(vocab_size=8481, head=head)
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0),
      jnp.zeros((2, 36, 2048)),
      jnp.ones((2, 5), jnp.int32),
      jnp.array([5, 3]),
      train=False,
    )
  )
  count = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
  print(f"{head}: {count:,} parameters")
  assert count == _reference_param_count(head)
  assert round(count / 1e6, 1) == millions


def _tiny(head="sgr", **kw):
  return SGRAF(
    vocab_size=50,
    head=head,
    img_dim=12,
    embed_dim=16,
    word_dim=8,
    sim_dim=8,
    **kw,
  )


def _batch(num_img=5, num_cap=7, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num_img, 6, 12)).astype(np.float32)
  lengths = rng.integers(2, 7, size=num_cap)
  tokens = rng.integers(4, 50, size=(num_cap, 6))
  tokens = np.where(np.arange(6)[None] < lengths[:, None], tokens, 0)
  return images, tokens, lengths


def test_build_model_reads_config_and_rejects_bad_values():
  cfg = base.get_config().model
  model = build_model(cfg, 123, execution.resolve())
  assert (model.head, model.embed_dim, model.sim_dim, model.vocab_size) == (
    "sgr",
    1024,
    256,
    123,
  )
  cfg.dtype = "bfloat16"
  assert build_model(cfg, 10, execution.resolve()).dtype == jnp.bfloat16
  config = base.get_config()
  config.model.head = "ave"
  with pytest.raises(UserError, match="config.model.head"):
    config_checks.validate(config)
  config.model.head, config.model.dtype = "saf", "float16"
  with pytest.raises(UserError, match="config.model.dtype"):
    config_checks.validate(config)


@pytest.mark.parametrize("head", ["sgr", "saf"])
def test_train_step_shapes_finite_and_stateful_under_jit(head):
  model = _tiny(head, cap_chunk=4)
  images, tokens, lengths = _batch()
  variables = model.init(jax.random.PRNGKey(0), images, tokens, lengths, train=False)

  @jax.jit
  def train_forward(params, key):
    def total(params):
      scores, updates = model.apply(
        {**variables, "params": params},
        images,
        tokens,
        lengths,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": key},
      )
      return scores.sum(), (scores, updates)

    return jax.grad(total, has_aux=True)(params)

  grads, (scores, updates) = train_forward(variables["params"], jax.random.PRNGKey(1))
  chex.assert_shape(scores, (5, 7))
  chex.assert_tree_all_finite((scores, updates, grads))
  assert np.all((scores > 0) & (scores < 1))
  changed = jax.tree_util.tree_map(
    lambda a, b: not np.allclose(a, b), updates["batch_stats"], variables["batch_stats"]
  )
  assert all(jax.tree_util.tree_leaves(changed))
  _, (other, _) = train_forward(variables["params"], jax.random.PRNGKey(2))
  assert not np.allclose(scores, other)  # dropout is active in train mode


def test_bfloat16_compute_keeps_float32_params_and_close_scores():
  images, tokens, lengths = _batch()
  model = _tiny()
  variables = model.init(jax.random.PRNGKey(0), images, tokens, lengths, train=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  full = model.apply(variables, images, tokens, lengths, train=False)
  half = _tiny(dtype=jnp.bfloat16).apply(
    variables, images, tokens, lengths, train=False
  )
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=2e-2)


def test_score_all_matches_one_block_and_compiles_once():
  model = _tiny("saf", cap_chunk=2)
  images, tokens, lengths = _batch(num_img=7, num_cap=11, seed=3)
  variables = model.init(jax.random.PRNGKey(0), images, tokens, lengths, train=False)
  img = model.apply(variables, images, train=False, method=SGRAF.encode_images)
  cap = model.apply(
    variables, tokens, lengths, train=False, method=SGRAF.encode_captions
  )
  expected = model.apply(variables, img, cap, train=False, method=SGRAF.score)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def score_block(img_block, cap_block):
    return model.apply(variables, img_block, cap_block, train=False, method=SGRAF.score)

  calls = []
  sims = score_all(
    score_block,
    img,
    cap,
    img_tile=3,
    cap_tile=4,
    progress=lambda done, total: calls.append((done, total)),
  )
  chex.assert_shape(sims, (7, 11))
  assert sims.dtype == np.float32
  np.testing.assert_allclose(sims, expected, rtol=1e-5)
  assert calls == [(k, 9) for k in range(1, 10)]
  # Host copies of the embeddings take the same compiled path.
  host = score_all(
    score_block,
    jax.tree_util.tree_map(np.asarray, img),
    jax.tree_util.tree_map(np.asarray, cap),
    img_tile=3,
    cap_tile=4,
  )
  np.testing.assert_allclose(host, sims, rtol=1e-6)
  chex.clear_trace_counter()
