"""Block scoring equals the reference's caption-by-caption, unpadded scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srem_jax.models import heads
from srem_jax.models.heads import GraphReasoning
from srem_jax.models.numerics import masked_softmax
from srem_jax.models.sgraf import SGRAF, CaptionEmbedding, ImageEmbedding

NUM_IMG, MAX_LEN = 3, 7


def _model_and_data(head, seed=0):
  rng = np.random.default_rng(seed)
  # Four captions against a chunk of three: the scan also runs a padded chunk.
  model = SGRAF(
    vocab_size=50,
    head=head,
    img_dim=12,
    embed_dim=16,
    word_dim=8,
    sim_dim=8,
    cap_chunk=3,
  )
  images = rng.normal(size=(NUM_IMG, 6, 12)).astype(np.float32)
  lengths = rng.integers(2, MAX_LEN + 1, size=4)
  tokens = rng.integers(4, 50, size=(4, MAX_LEN))
  tokens = np.where(np.arange(MAX_LEN)[None] < lengths[:, None], tokens, 0)
  variables = model.init(jax.random.PRNGKey(seed), images, tokens, lengths, train=False)
  if head == "saf":  # non-trivial running statistics
    stats = variables["batch_stats"]["sim_enc"]
    variables["batch_stats"]["sim_enc"] = {
      "saf_bn_mean": stats["saf_bn_mean"] + 0.3,
      "saf_bn_var": stats["saf_bn_var"] * 0.5,
    }
  return model, variables, images, tokens, lengths


def _embed(model, variables, images, tokens, lengths):
  img = model.apply(variables, images, train=False, method=SGRAF.encode_images)
  cap = model.apply(
    variables, tokens, lengths, train=False, method=SGRAF.encode_captions
  )
  return img, cap


@pytest.mark.parametrize("head", ["sgr", "saf"])
def test_block_scores_equal_one_pair_at_a_time(head):
  model, variables, images, tokens, lengths = _model_and_data(head)
  block = model.apply(variables, images, tokens, lengths, train=False)
  img, _ = _embed(model, variables, images, tokens, lengths)
  encode = jax.jit(
    lambda t, n: model.apply(variables, t, n, train=False, method=SGRAF.encode_captions)
  )
  score = jax.jit(
    lambda i, c: model.apply(variables, i, c, train=False, method=SGRAF.score)
  )
  for m, length in enumerate(lengths):
    # The caption alone, unpadded, as the reference slices cap_emb[i, :n_word].
    alone = encode(tokens[m : m + 1, :length], lengths[m : m + 1])
    for n in range(NUM_IMG):
      pair = score(ImageEmbedding(img.local[n : n + 1], img.glob[n : n + 1]), alone)
      np.testing.assert_allclose(block[n, m], pair[0, 0], rtol=1e-5)


def test_saf_train_mode_equals_reference_caption_loop():
  """Per-caption BatchNorm statistics and one running update per caption."""
  model, variables, images, tokens, lengths = _model_and_data("saf", seed=1)
  img, cap = _embed(model, variables, images, tokens, lengths)
  block, updates = model.apply(
    variables, img, cap, train=True, mutable=["batch_stats"], method=SGRAF.score
  )
  looped = dict(variables)
  for m, length in enumerate(lengths):
    alone = CaptionEmbedding(
      cap.words[m : m + 1, :length], cap.glob[m : m + 1], cap.mask[m : m + 1, :length]
    )
    column, stats = model.apply(
      looped, img, alone, train=True, mutable=["batch_stats"], method=SGRAF.score
    )
    np.testing.assert_allclose(block[:, m], column[:, 0], rtol=1e-5)
    looped = {**looped, "batch_stats": stats["batch_stats"]}
  block_stats = jax.tree_util.tree_map(np.asarray, updates["batch_stats"]["sim_enc"])
  expected = jax.tree_util.tree_map(np.asarray, looped["batch_stats"]["sim_enc"])
  for name in ("saf_bn_mean", "saf_bn_var"):
    np.testing.assert_allclose(block_stats[name], expected[name], rtol=1e-5)
  assert not np.allclose(
    expected["saf_bn_mean"], variables["batch_stats"]["sim_enc"]["saf_bn_mean"]
  )


def test_saf_train_statistics_ignore_padded_words():
  model, variables, images, tokens, lengths = _model_and_data("saf", seed=2)
  img, cap = _embed(model, variables, images, tokens, lengths)
  padded = CaptionEmbedding(
    np.pad(cap.words, ((0, 0), (0, 3), (0, 0))),
    cap.glob,
    np.pad(cap.mask, ((0, 0), (0, 3))),
  )
  run = lambda c: model.apply(
    variables, img, c, train=True, mutable=["batch_stats"], method=SGRAF.score
  )
  (scores, stats), (scores_padded, stats_padded) = run(cap), run(padded)
  np.testing.assert_allclose(scores, scores_padded, rtol=1e-5)
  np.testing.assert_allclose(
    stats["batch_stats"]["sim_enc"]["saf_bn_var"],
    stats_padded["batch_stats"]["sim_enc"]["saf_bn_var"],
    rtol=1e-5,
  )


def test_masked_softmax_gives_masked_entries_zero_and_survives_empty_rows():
  logits = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
  mask = np.array([[True, True, False], [False, False, False]])
  probs = np.asarray(masked_softmax(logits, mask))
  e = np.exp([1.0, 2.0])
  np.testing.assert_allclose(probs[0], [e[0] / e.sum(), e[1] / e.sum(), 0.0], rtol=1e-6)
  np.testing.assert_array_equal(probs[1], 0.0)


def _reference_sgr_step(nodes, node_mask, params):
  """The reference's SGR step in float64: separate query, key and output layers."""
  p = {
    k: {n: np.asarray(v, np.float64) for n, v in w.items()} for k, w in params.items()
  }
  x = np.asarray(nodes, np.float64)
  query = x @ p["graph_query_w"]["kernel"] + p["graph_query_w"]["bias"]
  key = x @ p["graph_key_w"]["kernel"] + p["graph_key_w"]["bias"]
  logits = np.einsum("ncis,ncjs->ncij", query, key)
  logits = np.where(node_mask[None, :, None, :], logits, -np.inf)
  edges = np.exp(logits - logits.max(-1, keepdims=True))
  edges /= edges.sum(-1, keepdims=True)
  out = np.einsum("ncij,ncjs->ncis", edges, x) @ p["sim_graph_w"]["kernel"]
  return np.maximum(out + p["sim_graph_w"]["bias"], 0.0)


@pytest.mark.parametrize("only_first", [False, True])
def test_folded_sgr_step_equals_separate_query_key_and_output_layers(only_first):
  rng = np.random.default_rng(4)
  num_img, num_cap, nodes_per_pair, sim = 2, 3, 6, 8
  nodes = rng.normal(size=(num_img, num_cap, nodes_per_pair, sim)).astype(np.float32)
  node_mask = np.arange(nodes_per_pair)[None] < np.array([[6], [2], [4]])
  step = GraphReasoning(sim, only_first=only_first)
  params = step.init(jax.random.PRNGKey(0), nodes, node_mask)["params"]
  # Non-zero biases, so the bias terms the folding relies on are exercised.
  params = jax.tree.map(
    lambda x: x + rng.normal(scale=0.3, size=x.shape).astype(np.float32), params
  )
  got = jax.jit(step.apply)({"params": params}, nodes, node_mask)
  want = _reference_sgr_step(nodes, node_mask, params)
  if only_first:
    want = want[:, :, 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_context_and_squared_difference_gradients_equal_float64():
  rng = np.random.default_rng(5)
  n, r, m, e, c, length = 3, 4, 10, 6, 2, 5
  attn, local = rng.random((n, r, m)), rng.normal(size=(n, r, e))
  cot = rng.normal(size=(n, m, e))
  f32 = lambda *xs: [np.asarray(x, np.float32) for x in xs]
  out, vjp = jax.vjp(
    lambda a, v: heads.attended_context(a, v, jnp.float32), *f32(attn, local)
  )
  np.testing.assert_allclose(out, np.einsum("nrm,nre->nme", attn, local), rtol=1e-5)
  grad_attn, grad_local = vjp(*f32(cot))
  np.testing.assert_allclose(
    grad_attn, np.einsum("nme,nre->nrm", cot, local), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    grad_local, np.einsum("nrm,nme->nre", attn, cot), rtol=1e-5, atol=1e-6
  )

  context, words = rng.normal(size=(n, c, length, e)), rng.normal(size=(c, length, e))
  cot = rng.normal(size=(n, c, length, e))
  out, vjp = jax.vjp(heads.squared_difference, *f32(context, words))
  np.testing.assert_allclose(out, (context - words) ** 2, rtol=1e-5)
  grad_context, grad_words = vjp(*f32(cot))
  np.testing.assert_allclose(grad_context, 2 * (context - words) * cot, rtol=1e-5)
  np.testing.assert_allclose(
    grad_words, -np.sum(2 * (context - words) * cot, axis=0), rtol=1e-5, atol=1e-6
  )


def _plain_context(attn, local, dtype, precision="highest"):
  return jnp.einsum("nrm,nre->nme", attn, local)


def _plain_squared_difference(context, words):
  return jnp.square(context - words[None])


def _score_gradients(block, variables, img, cap, weights, train=True):
  """Gradients of sum(weights * scores) with respect to the parameters, the
  image embedding, the words and the caption vector; and (scores, updates)."""

  def loss(params, img, words, cap_glob):
    scores, updates = block.apply(
      {**variables, "params": params},
      img,
      CaptionEmbedding(words, cap_glob, cap.mask),
      train=train,
      mutable=["batch_stats"],
      method=SGRAF.score,
    )
    return jnp.sum(weights * scores), (scores, updates)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
  return grad(variables["params"], img, cap.words, cap.glob)


@pytest.mark.parametrize(
  "head, img_chunk, remat",
  [("sgr", 2, "dots"), ("sgr", 3, "none"), ("saf", 2, "dots")],
)
def test_head_gradients_equal_plain_autodiff_and_ignore_chunking(
  head, img_chunk, remat, monkeypatch
):
  """Hand-written gradients inside the scan equal autodiff of the plain formulas.

  Three images in chunks of 2 also run a padded image chunk; SAF in train mode
  scans caption chunks instead.
  """
  model, variables, images, tokens, lengths = _model_and_data(head, seed=3)
  img, cap = _embed(model, variables, images, tokens, lengths)
  weights = np.random.default_rng(6).normal(size=(NUM_IMG, len(lengths)))

  def grads(**fields):
    return _score_gradients(model.clone(**fields), variables, img, cap, weights)[0]

  fast = grads(img_chunk=img_chunk, remat=remat)
  monkeypatch.setattr(heads, "attended_context", _plain_context)
  monkeypatch.setattr(heads, "squared_difference", _plain_squared_difference)
  plain = grads(img_chunk=1, remat="none")
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  jax.tree.map(close, fast, plain)


def test_sgr_training_scores_in_image_chunks_equal_caption_chunks():
  """Training SGR scans (padded) image chunks, scoring scans caption chunks
  (checked pair by pair above); the head has no train-mode layers, so the
  two must agree."""
  model, variables, images, tokens, lengths = _model_and_data("sgr", seed=4)
  img, cap = _embed(model, variables, images, tokens, lengths)
  score = lambda train: model.clone(img_chunk=2).apply(
    variables, img, cap, train=train, method=SGRAF.score
  )
  np.testing.assert_allclose(score(True), score(False), rtol=1e-5, atol=1e-7)


# ---- scoring by caption length ----------------------------------------------


def _long_and_short(head, seed):
  """Nine captions of 2-30 tokens padded to 30 (buckets 8, 12, 16, 20, 24, 30)
  against five images."""
  rng = np.random.default_rng(seed)
  model = SGRAF(vocab_size=50, head=head, img_dim=12, embed_dim=16, word_dim=8,
                sim_dim=8, cap_chunk=2, img_chunk=2, length_group=4)  # fmt: skip
  static = 30
  lengths = np.array([3, 30, 5, 9, 2, 13, 7, 4, 22])
  tokens = rng.integers(4, 50, size=(len(lengths), static))
  tokens = np.where(np.arange(static)[None] < lengths[:, None], tokens, 0)
  images = rng.normal(size=(5, 6, 12)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(seed), images, tokens, lengths, train=False)
  return model, variables, images, tokens, lengths


@pytest.mark.parametrize(
  "head, train", [("sgr", True), ("sgr", False), ("saf", True), ("saf", False)]
)
def test_scoring_by_length_equals_padded_scoring_and_its_gradients(head, train):
  """Groups cut to their own bucket give the padded head's scores, gradients
  and SAF statistics: only masked word positions are dropped, so they differ
  by float32 summation order. Nine captions in groups of 4 (training SGR) or
  2 also run a padded group; five images in chunks of 2 a padded chunk."""
  model, variables, images, tokens, lengths = _long_and_short(head, seed=5)
  img, cap = _embed(model, variables, images, tokens, lengths)
  weights = np.random.default_rng(7).normal(size=(5, len(lengths)))

  def run(length_group):
    block = model.clone(length_group=length_group)
    return _score_gradients(block, variables, img, cap, weights, train=train)

  by_length, padded = run(4), run(0)
  np.testing.assert_allclose(by_length[1][0], padded[1][0], rtol=0, atol=2e-6)
  # SAF's train-mode BatchNorm amplifies summation-order noise in gradients:
  # padding the plain head's words by five more zeros moves them by ~1e-5 of
  # their largest entry too, so entries are compared on that scale.
  close = lambda a, b: np.testing.assert_allclose(
    a, b, rtol=2e-4, atol=max(1e-6, 2e-4 * float(np.max(np.abs(b))))
  )
  jax.tree.map(close, by_length[0], padded[0])
  jax.tree.map(close, by_length[1][1], padded[1][1])
  if head == "saf" and train:
    assert by_length[1][1]["batch_stats"]["sim_enc"]["saf_bn_mean"] != 0


def test_scoring_by_length_switches_between_every_bucket_and_trims_words():
  """The program holds one branch per bucket below the padded length, each
  with the words cut to that bucket."""
  model, variables, images, tokens, lengths = _long_and_short("sgr", seed=6)
  img, cap = _embed(model, variables, images, tokens, lengths)
  jaxpr = jax.make_jaxpr(
    lambda i, c: model.apply(variables, i, c, train=False, method=SGRAF.score)
  )(img, cap)
  switches = [eqn for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "cond"]
  assert len(switches) == 1
  branches = switches[0].params["branches"]
  cut = [
    {eqn.outvars[0].aval.shape for eqn in _all_eqns(b.jaxpr)
     if eqn.primitive.name == "slice"}
    for b in branches
  ]  # fmt: skip
  # Each branch cuts a group's words (2, 30, 16) and mask (2, 30) to its bucket.
  for bucket, shapes in zip((8, 12, 16, 20, 24), cut):
    assert {(2, bucket, 16), (2, bucket)} <= shapes, (bucket, shapes)
  assert len(branches) == 6 and not {(2, 30, 16)} & cut[-1]


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _all_eqns(getattr(inner, "jaxpr", inner))
