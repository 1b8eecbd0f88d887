"""Scoring a block of captions in groups of similar length (`scores_by_length`).

A padded word position costs the all-pairs head as much as a real one, and a
batch's longest caption is about three times its mean on Flickr30K. So the
head (`heads.SimilarityHead`, with `length_group` > 0) orders a block's
captions by length and scores consecutive groups with their words cut to the
smallest bucket (`srem_jax.padding`) that holds the group's longest caption,
the bucket picked at run time by `lax.switch` so the compiled shapes stay
bounded. Trimming drops only masked positions: scores, gradients and SAF's
statistics equal the padded head's up to float32 summation order
(tests/test_heads.py).

    scores, saf_stats = scores_by_length(
      PairHead(...), params, policy, (local, img_glob), (words, glob, mask),
      running, img_chunk=4, cap_chunk=16,
    )
"""

import jax
import jax.numpy as jnp

from srem_jax import padding


def scores_by_length(
  pair, params, policy, images, captions, running, *, img_chunk, cap_chunk
):
  """All-pairs scores with each group of captions cut to its own bucket length.

  Captions are ordered by length; consecutive groups of `cap_chunk` are
  scored with their words trimmed to the smallest bucket
  (`padding.bucket_lengths` of the padded length) that holds the group's
  longest caption, chosen at run time by `lax.switch`, and the scores are put
  back in caption order. Trimming drops only masked positions, so a score
  changes by float32 summation order at most. With `img_chunk`, each group
  scans the images in strided chunks (SGR training), otherwise all images at
  once. Returns (scores, SAF (means, variances, counts) in caption order or
  None), or None for a padded length of at most twice the shortest bucket
  (captions of up to 16 tokens are scored as they are).
  """
  words, cap_glob, mask = captions
  num_imgs, (num_caps, length) = images[0].shape[0], mask.shape
  lengths = padding.bucket_lengths(length)
  if length <= 2 * lengths[0]:
    # At most half the positions could go, typically far fewer, and the
    # trimmed branches' backward repeats their forward: not worth it.
    return None
  order = jnp.argsort(jnp.sum(mask, axis=1), stable=True)
  group = min(cap_chunk, num_caps)
  pad = -num_caps % group
  # Pad captions have one real (zero) word so that nothing divides by zero.
  pad_mask = jnp.zeros((pad, length), bool).at[:, 0].set(True)
  groups = (
    chunked(pad_rows(words[order], pad), group),
    chunked(pad_rows(cap_glob[order], pad), group),
    chunked(jnp.concatenate([mask[order], pad_mask]), group),
  )
  longest = jnp.max(jnp.sum(groups[2], axis=2), axis=1)
  which = jnp.searchsorted(jnp.asarray(lengths), longest, side="left")

  def score_group(params, images, group_caps, running):
    if not img_chunk:
      return _apply_pair(pair, policy, params, images, group_caps, running)
    chunk = min(img_chunk, num_imgs)
    img_pad = -num_imgs % chunk
    # Strided chunks: step s takes rows s, s + steps, ...; pad images are all
    # zeros, which every normalisation maps to zero.
    strided = jax.tree.map(
      lambda x: jnp.swapaxes(
        pad_rows(x, img_pad).reshape((chunk, -1) + x.shape[1:]), 0, 1
      ),
      images,
    )

    def step(carry, img):
      return carry, _apply_pair(pair, policy, params, img, group_caps, running)

    _, (scores, stats) = jax.lax.scan(step, None, strided)
    return jnp.swapaxes(scores, 0, 1).reshape(-1, group)[:num_imgs], stats

  trimmed = _trimmed_switch(score_group, lengths)

  def each_group(carry, xs):
    index, group_caps = xs
    return carry, trimmed(index, params, images, group_caps, running)

  _, (scores, stats) = jax.lax.scan(each_group, None, (which, groups))
  inverse = jnp.argsort(order)
  scores = jnp.moveaxis(scores, 0, 1).reshape(num_imgs, -1)[:, inverse]
  if stats is not None:  # SAF, scored in caption chunks
    stats = tuple(s.reshape(-1)[inverse] for s in stats)
  return scores, stats


def _apply_pair(pair, policy, params, images, captions, running):
  def apply(params, images, captions, running):
    return pair.apply({"params": params}, None, images, captions, running)[1]

  if policy is not None:
    apply = jax.checkpoint(apply, prevent_cse=False, policy=policy)
  return apply(params, images, captions, running)


def _trimmed_switch(fn, lengths):
  """fn(params, images, captions, running) with the captions' word axis cut to
  lengths[index], the branch picked at run time.

  Differentiating `lax.switch` makes every branch emit every branch's
  residuals (zeros for the others), so the gradient is written out: the
  forward keeps only its inputs, and the backward recomputes the taken
  branch's forward (its own remat policy applies) under `jax.vjp`.
  """

  def branch(n):
    def run(params, images, captions, running):
      words, glob, mask = captions
      return fn(params, images, (words[:, :n], glob, mask[:, :n]), running)

    return run

  branches = [branch(n) for n in lengths]

  @jax.custom_vjp
  def call(index, params, images, captions, running):
    return jax.lax.switch(index, branches, params, images, captions, running)

  def call_fwd(index, params, images, captions, running):
    out = call(index, params, images, captions, running)
    return out, (index, params, images, captions, running)

  def call_bwd(residuals, grad):
    index, params, images, (words, glob, mask), running = residuals

    def backward(run):
      def pull(params, images, words, glob):
        _, vjp = jax.vjp(
          lambda p, i, w, g: run(p, i, (w, g, mask), running),
          params,
          images,
          words,
          glob,
        )
        return vjp(grad)

      return pull

    grads = jax.lax.switch(
      index, [backward(run) for run in branches], params, images, words, glob
    )
    d_params, d_images, d_words, d_glob = grads
    return None, d_params, d_images, (d_words, d_glob, None), None

  call.defvjp(call_fwd, call_bwd)
  return call


def pad_rows(x: jax.Array, pad: int) -> jax.Array:
  return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


def chunked(x: jax.Array, chunk: int) -> jax.Array:
  return x.reshape((-1, chunk) + x.shape[1:])
