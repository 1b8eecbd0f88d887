"""SGRAF's similarity heads, every image x every caption.

Owns the per-pair SGR and SAF heads and `SimilarityHead`, which scores a whole block of images
against a block of captions with masks for padded words so that each score
equals the reference's unpadded computation (docs/method.md §Network). Names
follow the PyTorch modules (`v_global_w.embedding_local`, `sim_tranloc_w`,
`SGR_module_<i>.graph_query_w`, `SAF_module.attn_sim_w`, ...).

The block is processed in chunks under `nn.scan`, so the (images, captions,
words, E) context tensor, the largest intermediate, only ever exists for one
chunk: chunks of `img_chunk` images when training SGR, whose backward pass
then runs each image's context products over chunk x captions x words rows
(several times faster than a caption chunk's many small products), and
chunks of `cap_chunk` captions otherwise (scoring alone measured faster so,
and SAF's train-mode statistics span all images of a caption). The context
product and the squared difference carry hand-written gradients that keep
XLA from transposing or reducing that tensor slowly. `remat` chooses what a
chunk keeps for the backward pass (`REMAT_POLICIES`); the default keeps the
dense layers' outputs and recomputes the context. Blocks padded beyond 16
tokens score their captions in groups of similar length, each with its words
cut to the smallest bucket
(`srem_jax.padding`) that holds its longest caption (`length_group`,
`by_length.py`; 0 pads every caption to the block's length, the plain scan
kept as reference): a
padded word position costs as much as a real one, and a batch's longest
caption is about three times its mean. In the train step the
head runs per device under `shard_map` (`axis_name`): each device scores its
own images against every caption, and SAF sums its statistics over devices.

Train-mode BatchNorm versus the reference's loop over captions:
- SAF's one-channel BatchNorm is normalised per caption with statistics over
  (images x real nodes of that caption), as the reference's loop does. The
  reference updates the running statistics once per caption, in caption
  order; we apply the same M updates in closed form
  (r <- 0.9^M r + sum_k 0.1 * 0.9^(M-1-k) s_k), so running statistics after
  a block equal the reference's after the same batch. They differ only when a
  training batch is scored in several calls (each call is one chain of
  updates, in call order) or when captions are padded (pad captions are
  excluded).

    head = SimilarityHead(head="sgr", sim_dim=8, sgr_steps=3, smooth=9.0)
    variables = head.init(key, local, img_glob, words, cap_glob, mask, train=False)
    scores = head.apply(variables, local, img_glob, words, cap_glob, mask, train=False)
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from srem_jax.models.by_length import chunked, pad_rows, scores_by_length
from srem_jax.models.encoders import (
  TORCH_BN_EPS,
  TORCH_BN_MOMENTUM,
  dense,
  l1_normalize,
  l2_normalize,
)
from srem_jax.models.numerics import lax_precision, masked_softmax, matmul, on_cpu

# What a caption chunk keeps for the backward pass: everything ("none"),
# only its inputs ("full": the backward repeats the whole forward), or the
# outputs of the unbatched matmuls ("dots": the (images, captions, words, E)
# context and the elementwise work around it are recomputed, the dense layers
# are not).
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_MODES = tuple(REMAT_POLICIES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def attended_context(
  attn: jax.Array, local: jax.Array, dtype: Any, precision: str = "highest"
) -> jax.Array:
  """Context (n, m, E) = attn (n, R, m) contracted with regions (n, R, E) over R.

  Its gradients are written out so that each product contracts a leading or
  trailing axis of the (n, m, E) cotangent; plain autodiff made XLA transpose
  that tensor (the largest of the step) before the regions' gradient.
  """
  return matmul("nrm,nre->nme", attn, local, dtype, precision)


def _attended_context_fwd(attn, local, dtype, precision):
  return attended_context(attn, local, dtype, precision), (attn, local)


def _attended_context_bwd(dtype, precision, residuals, grad):
  attn, local = residuals
  grad_attn = jnp.swapaxes(matmul("nme,nre->nmr", grad, local, dtype, precision), 1, 2)
  grad_local = matmul("nrm,nme->nre", attn, grad, dtype, precision)
  return grad_attn.astype(attn.dtype), grad_local.astype(local.dtype)


attended_context.defvjp(_attended_context_fwd, _attended_context_bwd)


@jax.custom_vjp
def squared_difference(context: jax.Array, words: jax.Array) -> jax.Array:
  """(context - words)^2 for context (n, c, l, E) and words (c, l, E).

  On the CPU the words' gradient sums the n image slices with n - 1 plain
  adds: XLA's CPU runtime otherwise emits a reduce over the leading axis that
  ran ~15x slower than memory allows inside the fused dot it lands in. Other
  platforms get the plain sum (`sum_image_slices`).
  """
  return jnp.square(context - words[None])


def _squared_difference_fwd(context, words):
  return squared_difference(context, words), (context, words)


def sum_image_slices(x: jax.Array, path: str) -> jax.Array:
  """x summed over its leading axis: "cpu" as n - 1 adds of slices, "plain"
  as one reduction; the same numbers up to float32 summation order."""
  if path == "plain":
    return jnp.sum(x, axis=0)
  total = x[0]
  for i in range(1, x.shape[0]):
    total = total + x[i]
  return total


def _squared_difference_bwd(residuals, grad):
  context, words = residuals
  grad_context = 2 * (context - words[None]) * grad
  summed = on_cpu(
    functools.partial(sum_image_slices, path="cpu"),
    functools.partial(sum_image_slices, path="plain"),
    grad_context.astype(jnp.float32),  # bfloat16 chains: sum in float32
  )
  return grad_context, -summed.astype(words.dtype)


squared_difference.defvjp(_squared_difference_fwd, _squared_difference_bwd)


class DenseParams(nn.Module):
  """The kernel and bias of a reference-initialised linear layer, unapplied.

  Lets a layer's weights be combined with another's before touching the
  (many) pair activations, under the same parameter names as `dense`.
  """

  in_features: int
  features: int

  @nn.compact
  def __call__(self):
    kernel = self.param(
      "kernel", nn.initializers.xavier_uniform(), (self.in_features, self.features)
    )
    return kernel, self.param("bias", nn.initializers.zeros, (self.features,))


def _linear(x, kernel, bias, dtype, precision):
  return matmul("...i,io->...o", x, kernel, dtype, precision) + bias


class GraphReasoning(nn.Module):
  """One SGR step over nodes (..., K, S); edges only towards real key nodes.

  The reference's step is relu(W_g(softmax_j(q_i . k_j) x_j)) with
  q = W_q x + b_q and k = W_k x + b_k. Terms of q_i . k_j constant in j
  cancel in the softmax, so the logits are (x_i W_q W_k^T + W_k b_q) . x_j,
  and since every edge row sums to 1, W_g moves inside the sum. One
  (K, S) x (S, 2S) matmul then replaces three (K, S) x (S, S) ones. With
  `only_first` (the last step: the head reads node 0 alone) only node 0's
  row is computed.
  """

  sim_dim: int
  only_first: bool = False
  dtype: Any = jnp.float32
  precision: str = "highest"

  @nn.compact
  def __call__(self, nodes: jax.Array, node_mask: jax.Array) -> jax.Array:
    in_dim = nodes.shape[-1]
    query_kernel, query_bias = DenseParams(in_dim, self.sim_dim, name="graph_query_w")()
    key_kernel, _ = DenseParams(in_dim, self.sim_dim, name="graph_key_w")()
    graph_kernel, graph_bias = DenseParams(in_dim, self.sim_dim, name="sim_graph_w")()
    exact = lax_precision(self.precision)
    bilinear = jnp.matmul(query_kernel, key_kernel.T, precision=exact)
    key_bias = jnp.matmul(key_kernel, query_bias, precision=exact)
    dtype, precision = self.dtype, self.precision
    edge_mask = node_mask[None, :, None, :]
    if self.only_first:
      query = _linear(nodes[:, :, :1], bilinear, key_bias, dtype, precision)
      logits = matmul("ncis,ncjs->ncij", query, nodes, dtype, precision)
      edges = masked_softmax(logits, edge_mask, axis=-1)
      gathered = matmul("ncij,ncjs->ncis", edges, nodes, dtype, precision)
      return nn.relu(
        _linear(gathered[:, :, 0], graph_kernel, graph_bias, dtype, precision)
      )
    projected = matmul(
      "ncjs,st->ncjt",
      nodes,
      jnp.concatenate([bilinear, graph_kernel], axis=1),
      dtype,
      precision,
    )
    query, values = jnp.split(projected, 2, axis=-1)
    logits = matmul("ncis,ncjs->ncij", query + key_bias, nodes, dtype, precision)
    edges = masked_softmax(logits, edge_mask, axis=-1)
    return nn.relu(
      matmul("ncij,ncjs->ncis", edges, values, dtype, precision) + graph_bias
    )


class PairHead(nn.Module):
  """Scores of one chunk of images against one chunk of captions -> (N, C).

  A scan body: parameters are shared across chunks, SAF's running statistics
  arrive as an input and its per-caption batch statistics leave as an output,
  so the body never mutates state.
  """

  head: str
  sim_dim: int
  sgr_steps: int
  smooth: float
  train: bool
  dtype: Any = jnp.float32
  precision: str = "highest"
  axis_name: str | None = None

  @nn.compact
  def __call__(self, carry, images, captions, saf_running):
    local, img_glob = images
    words, cap_glob, mask = captions
    # SCAN attention: regions attend to words, normalised per region over the
    # caption's real words, then a smoothed softmax over regions per word.
    # Regions lead the (n, r, c, l) layout so that both context products and
    # their gradients contract over a leading or trailing axis: no transposes
    # of the (n, c, l, E) tensors.
    attn = matmul("nre,cle->nrcl", local, words, self.dtype, self.precision)
    attn = jax.nn.leaky_relu(attn, 0.1) * mask
    attn = jax.nn.softmax(self.smooth * l2_normalize(attn), axis=1)
    n, r, c, length = attn.shape
    context = attended_context(
      attn.reshape(n, r, c * length), local, self.dtype, self.precision
    )
    # The (n, c, l, E) chain from the context to the local-node layer is
    # memory-bound: it runs in the matmul dtype (norms summed in float32).
    context = l2_normalize(context.reshape(n, c, length, -1).astype(self.dtype))
    local_sim = squared_difference(context, words.astype(self.dtype))
    local_nodes = dense(self.sim_dim, self.dtype, "sim_tranloc_w", self.precision)(
      local_sim
    )
    global_sim = jnp.square(img_glob[:, None] - cap_glob[None])
    global_node = dense(self.sim_dim, self.dtype, "sim_tranglo_w", self.precision)(
      global_sim
    )
    nodes = jnp.concatenate(
      [
        l2_normalize(global_node.astype(jnp.float32))[:, :, None],
        l2_normalize(local_nodes.astype(jnp.float32)),
      ],
      axis=2,
    )
    node_mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)

    if self.head == "sgr":
      for step in range(self.sgr_steps):
        last = step == self.sgr_steps - 1
        nodes = GraphReasoning(
          self.sim_dim,
          only_first=last,
          dtype=self.dtype,
          precision=self.precision,
          name=f"SGR_module_{step}",
        )(nodes, node_mask)
      sim_vec = nodes if self.sgr_steps else nodes[:, :, 0]
      saf_stats = None
    else:
      sim_vec, saf_stats = AttentionFiltration(
        self.train, self.dtype, self.precision, self.axis_name, name="SAF_module"
      )(nodes, node_mask, saf_running)
    score = dense(1, self.dtype, "sim_eval_w", self.precision)(sim_vec)[..., 0].astype(
      jnp.float32
    )
    return carry, (jax.nn.sigmoid(score), saf_stats)


class AttentionFiltration(nn.Module):
  """SAF: gate each node by sigmoid(BN(w_a . x)), l1-normalise, pool, l2n.

  The one-channel BatchNorm uses per-caption statistics over (images x real
  nodes) in train mode, running statistics otherwise; returns the pooled
  vectors and the per-caption (mean, biased variance, count).
  """

  train: bool
  dtype: Any = jnp.float32
  precision: str = "highest"
  axis_name: str | None = None  # images split over this mesh axis: sum statistics

  @nn.compact
  def __call__(self, nodes, node_mask, running):
    logits = dense(1, self.dtype, "attn_sim_w", self.precision)(nodes)[..., 0].astype(
      jnp.float32
    )
    scale = self.param("bn_scale", nn.initializers.ones, (1,))
    bias = self.param("bn_bias", nn.initializers.zeros, (1,))
    real = node_mask[None].astype(jnp.float32)
    total = lambda x: x if self.axis_name is None else jax.lax.psum(x, self.axis_name)
    count = total(logits.shape[0] * jnp.sum(real, axis=(0, 2)))
    if self.train:
      mean = total(jnp.sum(logits * real, axis=(0, 2))) / count
      squares = jnp.sum(jnp.square(logits - mean[:, None]) * real, axis=(0, 2))
      var = total(squares) / count
    else:
      mean, var = (
        jnp.broadcast_to(running[0], count.shape),
        jnp.broadcast_to(running[1], count.shape),
      )
    normed = (logits - mean[:, None]) * jax.lax.rsqrt(var[:, None] + TORCH_BN_EPS)
    weights = l1_normalize(jax.nn.sigmoid(normed * scale + bias) * real)
    pooled = matmul("ncj,ncjs->ncs", weights, nodes, self.dtype, self.precision)
    return l2_normalize(pooled), (mean, var, count)


class SimilarityHead(nn.Module):
  """Every image x every caption -> (N, M) scores in (0, 1) (see module doc)."""

  head: str
  sim_dim: int
  sgr_steps: int
  smooth: float
  cap_chunk: int = 4
  dtype: Any = jnp.float32
  remat: str = "dots"
  img_chunk: int = 4
  precision: str = "highest"
  axis_name: str | None = None  # mesh axis the images are split over (shard_map)
  # Captions per length group when training SGR by image chunks; 0 scores
  # every caption at the padded length (the plain scan, kept as reference).
  length_group: int = 32

  @nn.compact
  def __call__(self, local, img_glob, words, cap_glob, mask, *, train: bool):
    images = (local.astype(jnp.float32), img_glob.astype(jnp.float32))
    captions = (words, cap_glob, mask)
    num_imgs, num_caps = local.shape[0], words.shape[0]
    # Training SGR scans image chunks: the backward pass then runs per-image
    # products of chunk x captions x words rows, several times faster than a
    # caption chunk's many small ones. Scoring alone was faster in caption
    # chunks, and SAF's train-mode statistics span every image of a caption.
    by_images = train and self.head == "sgr"
    if by_images:
      chunk = min(self.img_chunk, num_imgs)
      pad = -num_imgs % chunk
      # Strided chunks: step s takes rows s, s + steps, ... Pad images are all
      # zeros: every normalisation maps them to zero.
      images = jax.tree.map(
        lambda x: pad_rows(x, pad).reshape((chunk, -1) + x.shape[1:]), images
      )
      in_axes = (1, nn.broadcast, nn.broadcast)
    else:
      chunk = min(self.cap_chunk, num_caps)
      pad = -num_caps % chunk
      # Pad captions have one real (zero) word so that nothing divides by zero.
      pad_mask = jnp.zeros((pad, mask.shape[1]), bool).at[:, 0].set(True)
      captions = (
        chunked(pad_rows(words, pad), chunk),
        chunked(pad_rows(cap_glob, pad), chunk),
        chunked(jnp.concatenate([mask, pad_mask]), chunk),
      )
      in_axes = (nn.broadcast, 0, nn.broadcast)

    running = None
    if self.head == "saf":
      running_mean = self.variable("batch_stats", "saf_bn_mean", jnp.zeros, (1,))
      running_var = self.variable("batch_stats", "saf_bn_var", jnp.ones, (1,))
      running = (running_mean.value, running_var.value)

    pair_kw = dict(
      head=self.head,
      sim_dim=self.sim_dim,
      sgr_steps=self.sgr_steps,
      smooth=self.smooth,
      train=train,
      dtype=self.dtype,
      precision=self.precision,
      axis_name=self.axis_name,
    )
    if self.length_group and not self.is_initializing():
      by_length = scores_by_length(
        PairHead(**pair_kw),
        self.variables["params"]["pairs"],
        REMAT_POLICIES[self.remat],
        (local, img_glob),
        (words, cap_glob, mask),
        running,
        img_chunk=self.img_chunk if by_images else 0,
        cap_chunk=self.length_group if by_images else self.cap_chunk,
      )
      if by_length is not None:
        scores, saf_stats = by_length
        if self.head == "saf" and train:
          running_mean.value, running_var.value = _sequential_running_update(
            (running_mean.value, running_var.value), *saf_stats
          )
        return scores

    body = PairHead
    if self.remat != "none":
      body = nn.remat(PairHead, prevent_cse=False, policy=REMAT_POLICIES[self.remat])
    scan_head = nn.scan(
      body,
      variable_broadcast="params",
      split_rngs={"params": False},
      in_axes=in_axes,
      out_axes=1 if by_images else 0,
    )(**pair_kw, name="pairs")
    _, (scores, saf_stats) = scan_head(None, images, captions, running)
    if by_images:
      return scores.reshape(-1, num_caps)[:num_imgs]  # (chunk, steps, M) -> rows
    scores = jnp.moveaxis(scores, 0, 1).reshape(num_imgs, -1)[:, :num_caps]
    if self.head == "saf" and train and not self.is_initializing():
      mean, var, count = (s.reshape(-1)[:num_caps] for s in saf_stats)
      running_mean.value, running_var.value = _sequential_running_update(
        (running_mean.value, running_var.value), mean, var, count
      )
    return scores


def _sequential_running_update(running, means, variances, counts):
  """PyTorch's running update applied once per caption, in caption order."""
  decay = 1 - TORCH_BN_MOMENTUM
  num = means.shape[0]
  weights = TORCH_BN_MOMENTUM * decay ** jnp.arange(num - 1, -1, -1, dtype=jnp.float32)
  unbiased = variances * counts / jnp.maximum(counts - 1, 1)
  mean = decay**num * running[0] + jnp.sum(weights * means)
  var = decay**num * running[1] + jnp.sum(weights * unbiased)
  return mean, var
