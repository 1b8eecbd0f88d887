"""The SREM objective (docs/method.md, Objective): pure functions of a batch S.

`S` is a (K, K) array of similarities in (0, 1) with `S[i, j] = s(image_i,
caption_j)`; the diagonal holds the given, possibly mismatched, pairs. Every
function here is pure `jax.numpy`, jit-able and takes plain numbers, never a
config object; `objective` combines them the way `config.loss` selects
(`srem_jax.config_checks` checks that section once at start-up).

    loss, aux = objective(S, name="srem", tau=0.05, beta=0.5)
    grads = jax.grad(lambda s: objective(s)[0])(S)
"""

import jax
import jax.numpy as jnp

LOSS_NAMES = ("srem", "triplet_hardest", "ccl")
SELECTIONS = ("batch", "epoch_gmm")
BIASES = ("cross_modal", "same_modal")
NEGATIVES = ("hardest", "mean")  # which negatives SREM's clean-pair triplet uses
REDUCTIONS = ("sum", "mean")  # how it combines its selected anchors
# SREM's warm-up on every pair: RCL's complementary loss, NCR's mean-negative
# triplet (summed over anchors, as NCR warms up), or the complementary loss
# plus the mean-negative triplet summed over anchors or averaged over them
# (CMBCL's per-anchor scale).
WARMUPS = ("ccl", "triplet_mean", "ccl+triplet_mean", "ccl+anchor_triplet_mean")
# The loss on selected pairs: a triplet, or the in-batch classification
# cross-entropy over S / tau.
CLEAN_LOSSES = ("triplet", "ce")
# How the swapped entropy enters the selected pairs' loss: a certainty weight
# 1 - H/log K, a triplet margin alpha * (1 - H/log K), or the inverse emphasis
# H/log K.
ENTROPY_USES = ("weight", "margin", "inverse")


def batch_logits(S, tau):
  """In-batch classification logits `(S / tau, S.T / tau)`.

  Row i of the first scores image i over the K captions (i2t); row i of the
  second scores caption i over the K images (t2i).
  """
  return S / tau, S.T / tau


def energy(z, temp=1.0):
  """Row-wise energy `-temp * logsumexp(z / temp)`; low means a confident row."""
  return -temp * jax.nn.logsumexp(z / temp, axis=1)


def sample_energy(S, tau, temp=1.0):
  """Energy of each pair: the mean of its i2t and t2i row energies, shape (K,)."""
  z_i2t, z_t2i = batch_logits(S, tau)
  return 0.5 * (energy(z_i2t, temp) + energy(z_t2i, temp))


def swapped_entropy(S, tau):
  """Swapped classification entropy H_i (docs/method.md, Parts), shape (K,).

  Each modality's prediction for pair i is scored against the other's:
  `H_i = ½[-Σ_j P_i2t[i,j] log P_t2i[i,j] - Σ_j P_t2i[i,j] log P_i2t[i,j]]`.
  """
  z_i2t, z_t2i = batch_logits(S, tau)
  log_p_i2t = jax.nn.log_softmax(z_i2t, axis=1)
  log_p_t2i = jax.nn.log_softmax(z_t2i, axis=1)
  text_scored_by_image = -jnp.sum(jnp.exp(log_p_i2t) * log_p_t2i, axis=1)
  image_scored_by_text = -jnp.sum(jnp.exp(log_p_t2i) * log_p_i2t, axis=1)
  return 0.5 * (text_scored_by_image + image_scored_by_text)


def entropy_weight(H, K):
  """Per-sample weight `stop_gradient(clip(1 - H / log K, 0, 1))`.

  A batch of one pair has no alternative to be uncertain about (log 1 = 0), so
  its weight is 1.
  """
  log_k = jnp.log(jnp.maximum(jnp.asarray(K, H.dtype), 1.0))
  has_alternatives = log_k > 0
  safe_log_k = jnp.where(has_alternatives, log_k, 1.0)
  weight = jnp.where(has_alternatives, jnp.clip(1.0 - H / safe_log_k, 0.0, 1.0), 1.0)
  return jax.lax.stop_gradient(weight)


def batch_clean_mask(S, tau, temp=1.0, quantile=0.5):
  """Batch-level clean selection (docs/method.md, Parts), a (K,) bool mask (no gradient).

  Pair i is clean when its partner is the arg-max of its row in both directions
  (ties go to the lower index, as `argmax` does) and its energy is at or below
  the `quantile` of the batch energies (linear interpolation, `jnp.quantile`).
  """
  S = jax.lax.stop_gradient(S)
  index = jnp.arange(S.shape[0])
  partner_top_i2t = jnp.argmax(S, axis=1) == index
  partner_top_t2i = jnp.argmax(S, axis=0) == index
  pair_energy = sample_energy(S, tau, temp)
  low_energy = pair_energy <= jnp.quantile(pair_energy, quantile)
  return partner_top_i2t & partner_top_t2i & low_energy


def triplet_hardest(S, margin=0.2, weights=None, negatives="hardest"):
  """VSE++ max-violation triplet loss, summed over weighted anchors.

  Anchor i costs `[α - S_ii + max_{j≠i} S_ij]₊ + [α - S_ii + max_{j≠i} S_ji]₊`;
  the loss is `Σ_i weights_i · cost_i` (weights default to 1; 0 drops an
  anchor). A batch of one pair has no negative and costs nothing.
  `negatives="mean"` replaces each max by the mean of the K-1 hinges, so an
  anchor costs the same at equal scores (2α) and every negative gets gradient.
  `margin` is a number or a (K,) array of per-anchor margins α_i (anchor i's
  row and column hinges both use α_i).

  Returns `(loss, {"per_anchor": (K,) unweighted costs})`.
  """
  if negatives not in NEGATIVES:
    raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
  K = S.shape[0]
  positive = jnp.diagonal(S)
  off_diagonal = ~jnp.eye(K, dtype=bool)
  margin = jnp.broadcast_to(jnp.asarray(margin, S.dtype), (K,))
  # Clamping each violation before the max equals clamping the max, and the
  # zeroed diagonal then cannot win over a real negative.
  caption_violation = jnp.where(
    off_diagonal, jnp.maximum((margin - positive)[:, None] + S, 0.0), 0.0
  )
  image_violation = jnp.where(
    off_diagonal, jnp.maximum((margin - positive)[None, :] + S, 0.0), 0.0
  )
  if negatives == "hardest":
    per_anchor = caption_violation.max(axis=1) + image_violation.max(axis=0)
  else:
    count = max(K - 1, 1)
    per_anchor = (caption_violation.sum(axis=1) + image_violation.sum(axis=0)) / count
  if weights is None:
    weights = jnp.ones_like(per_anchor)
  return jnp.sum(weights * per_anchor), {"per_anchor": per_anchor}


def classification_loss(S, tau, weights=None):
  """In-batch classification cross-entropy over `S / tau`, summed over
  weighted anchors.

  Anchor i costs `½[-log P_i2t[i, i] - log P_t2i[i, i]]` (image i classifies
  its caption among the K, caption i its image); the loss is
  `Σ_i weights_i · cost_i`. Returns `(loss, {"per_anchor": (K,) costs})`.
  """
  z_i2t, z_t2i = batch_logits(S, tau)
  per_anchor = -0.5 * (
    jnp.diagonal(jax.nn.log_softmax(z_i2t, axis=1))
    + jnp.diagonal(jax.nn.log_softmax(z_t2i, axis=1))
  )
  if weights is None:
    weights = jnp.ones_like(per_anchor)
  return jnp.sum(weights * per_anchor), {"per_anchor": per_anchor}


def _complementary_bias(p_same, p_cross, beta, bias):
  """`Q = (1-β) U + β B` for one direction: zero diagonal, rows summing to 1."""
  K = p_same.shape[0]
  off_diagonal = 1.0 - jnp.eye(K, dtype=p_same.dtype)
  uniform = off_diagonal / max(K - 1, 1)
  if bias == "cross_modal":
    # B_ij ∝ P_other[j, i]: how strongly negative j, seen from the other
    # modality, points back at anchor i.
    affinity = p_cross.T
  elif bias == "same_modal":
    affinity = p_same
  else:
    raise ValueError(f"bias must be one of {BIASES}, got {bias!r}")
  affinity = jax.lax.stop_gradient(affinity) * off_diagonal
  row_total = affinity.sum(axis=1, keepdims=True)
  # A row whose probabilities all underflowed carries no preference: fall back
  # to uniform rather than divide by zero.
  has_mass = row_total > 0
  biased = jnp.where(has_mass, affinity / jnp.where(has_mass, row_total, 1.0), uniform)
  return (1.0 - beta) * uniform + beta * biased


def complementary_loss(S, tau, beta=0.0, bias="cross_modal", eps=1e-6):
  """Cross-modal biased complementary loss (CMBCL); β = 0 is RCL's CCL.

  Per anchor `Σ_{j≠i} Q_ij · -log(1 - P_ij + eps)`, averaged over anchors and
  summed over the i2t and t2i directions. `bias` picks B: "cross_modal" (docs/method.md,
  `B_ij ∝ P_other[j, i]`) or "same_modal" (`B_ij ∝ P_same[i, j]`, an ablation).

  Returns `(loss, aux)` with per-anchor losses and the Q matrices of both
  directions.
  """
  K = S.shape[0]
  z_i2t, z_t2i = batch_logits(S, tau)
  p_i2t = jax.nn.softmax(z_i2t, axis=1)
  p_t2i = jax.nn.softmax(z_t2i, axis=1)
  off_diagonal = ~jnp.eye(K, dtype=bool)

  def one_direction(p_same, p_cross):
    q = _complementary_bias(p_same, p_cross, beta, bias)
    # The diagonal has zero weight; hiding its probability keeps the log (and
    # its gradient) finite there even for a certain pair and eps = 0.
    p_negative = jnp.where(off_diagonal, p_same, 0.0)
    per_anchor = jnp.sum(q * -jnp.log(1.0 - p_negative + eps), axis=1)
    return per_anchor, q

  per_anchor_i2t, q_i2t = one_direction(p_i2t, p_t2i)
  per_anchor_t2i, q_t2i = one_direction(p_t2i, p_i2t)
  loss = jnp.mean(per_anchor_i2t) + jnp.mean(per_anchor_t2i)
  aux = {
    "per_anchor_i2t": per_anchor_i2t,
    "per_anchor_t2i": per_anchor_t2i,
    "q_i2t": q_i2t,
    "q_t2i": q_t2i,
  }
  return loss, aux


def per_sample_stats(S, tau, temp=1.0, valid=None):
  """In-batch cross-entropy, energy and swapped entropy of each pair.

  `ce` is the mean over both directions of `-log P[i, i]` (the epoch-level
  GMM's input); `energy` is `sample_energy`; `entropy` is `swapped_entropy`.
  `valid` ((K,) bool) removes padded pairs: their columns leave every
  softmax/logsumexp and their own entries are returned as 0.
  """
  z_i2t, z_t2i = batch_logits(S, tau)
  if valid is not None:
    z_i2t = jnp.where(valid[None, :], z_i2t, -jnp.inf)
    z_t2i = jnp.where(valid[None, :], z_t2i, -jnp.inf)
  log_p_i2t = jax.nn.log_softmax(z_i2t, axis=1)
  log_p_t2i = jax.nn.log_softmax(z_t2i, axis=1)
  # A padded column has P = 0 and log P = -inf; its product must count as 0.
  cross = jnp.exp(log_p_i2t) * log_p_t2i + jnp.exp(log_p_t2i) * log_p_i2t
  if valid is not None:
    cross = jnp.where(valid[None, :], cross, 0.0)
  stats = {
    "ce": -0.5 * (jnp.diagonal(log_p_i2t) + jnp.diagonal(log_p_t2i)),
    "energy": 0.5 * (energy(z_i2t, temp) + energy(z_t2i, temp)),
    "entropy": -0.5 * jnp.sum(cross, axis=1),
  }
  if valid is not None:
    stats = {key: jnp.where(valid, value, 0.0) for key, value in stats.items()}
  return stats


def warmup_loss(
  S,
  kind="ccl",
  *,
  tau=0.05,
  margin=0.2,
  bias="cross_modal",
  eps=1e-6,
  triplet_weight=1.0,
):
  """SREM's warm-up objective on every pair (`WARMUPS`).

  "ccl" is RCL's complementary loss (CMBCL with β = 0); "triplet_mean" is
  NCR's warm-up, the mean-negative triplet summed over anchors; with
  "ccl+triplet_mean" both are added, and "ccl+anchor_triplet_mean" adds the
  triplet averaged over anchors instead. The triplet part is multiplied by
  `triplet_weight`. Returns `(loss, parts)` with the (weighted) triplet part
  under "triplet" and the complementary part under "ccl".
  """
  if kind not in WARMUPS:
    raise ValueError(f"warmup must be one of {WARMUPS}, got {kind!r}")
  zero = jnp.zeros((), S.dtype)
  triplet = ccl = zero
  if "triplet_mean" in kind:
    triplet, _ = triplet_hardest(S, margin, negatives="mean")
    if kind.endswith("anchor_triplet_mean"):
      triplet = triplet / S.shape[0]
    triplet = triplet * triplet_weight
  if "ccl" in kind:
    ccl, _ = complementary_loss(S, tau, 0.0, bias, eps)
  return triplet + ccl, {"triplet": triplet, "ccl": ccl}


def selected_loss(
  S,
  selected,
  entropy,
  *,
  kind="triplet",
  entropy_use="weight",
  use_entropy=True,
  tau=0.05,
  margin=0.2,
  negatives="hardest",
  reduction="sum",
):
  """SREM's loss on the selected pairs and the per-pair weight it applied.

  `selected` is a (K,) float 0/1 mask and `entropy` the (K,) swapped
  entropy (no gradient). `kind` picks the loss (`CLEAN_LOSSES`);
  `entropy_use` how the certainty `c_i = clip(1 - H_i / log K, 0, 1)`
  enters (`ENTROPY_USES`): as a weight `c_i`, as the triplet margin
  `margin · c_i` (weight 1), or as the inverse weight `1 - c_i`.
  `use_entropy=False` applies none of them. `reduction="mean"` divides the
  sum over selected pairs by their number (at least 1).
  """
  K = S.shape[0]
  certainty = entropy_weight(entropy, K)
  unit = jnp.ones((K,), S.dtype)
  if not use_entropy:
    weight, margins = unit, margin
  elif entropy_use == "weight":
    weight, margins = certainty, margin
  elif entropy_use == "inverse":
    weight, margins = 1.0 - certainty, margin
  elif entropy_use == "margin":
    if kind != "triplet":
      raise ValueError("entropy_use='margin' needs the triplet loss")
    weight, margins = unit, margin * certainty
  else:
    raise ValueError(f"entropy_use must be one of {ENTROPY_USES}, got {entropy_use!r}")
  if kind == "triplet":
    loss, _ = triplet_hardest(S, margins, selected * weight, negatives)
  elif kind == "ce":
    loss, _ = classification_loss(S, tau, selected * weight)
  else:
    raise ValueError(f"clean_loss must be one of {CLEAN_LOSSES}, got {kind!r}")
  if reduction == "mean":
    loss = loss / jnp.maximum(jnp.sum(selected), 1.0)
  return loss, weight


def objective(
  S,
  *,
  name="srem",
  warmup=False,
  tau=0.05,
  energy_temp=1.0,
  margin=0.2,
  clean_quantile=0.5,
  use_filtration=True,
  use_entropy_weight=True,
  use_cmbcl=True,
  beta=0.5,
  bias="cross_modal",
  cmbcl_weight=1.0,
  eps=1e-6,
  warmup_loss_kind="ccl",
  warmup_triplet_weight=1.0,
  clean_loss="triplet",
  entropy_use="weight",
  clean_negatives="hardest",
  clean_reduction="sum",
  clean=None,
):
  """The training loss selected by `name`, with per-sample diagnostics.

  - "srem": `L = L_selected + cmbcl_weight · CMBCL(β)`, where `L_selected`
    is `selected_loss` of kind `clean_loss` over the clean pairs. `clean`
    (a (K,) bool from the epoch-level GMM) replaces the batch mask;
    `use_filtration=False` counts every pair clean; `use_entropy_weight=False`
    drops the swapped entropy's role (`entropy_use`); `use_cmbcl=False`
    drops the complementary term. `clean_negatives`/`clean_reduction` shape
    the triplet (hardest or mean negatives; summed or divided by the
    selected count). With `warmup=True` (a Python bool) it is
    `warmup_loss(warmup_loss_kind)` on all pairs.
  - "triplet_hardest": the hardest-negative triplet on all pairs.
  - "ccl": RCL's complementary loss (β = 0) on all pairs.

  aux holds scalars `loss`, `loss_clean`, `loss_cmbcl`, `clean_frac` and, per
  pair, `clean` (the mask the loss used), `energy`, `entropy` and `weight` (the
  entropy weight applied to clean pairs; 1 where none is applied), computed on
  stop-gradient S whatever the name. In the warm-up, `loss_clean` holds its
  triplet part and `loss_cmbcl` its complementary part.
  """
  if name not in LOSS_NAMES:
    raise ValueError(f"name must be one of {LOSS_NAMES}, got {name!r}")
  if clean_reduction not in REDUCTIONS:
    raise ValueError(f"clean_reduction must be one of {REDUCTIONS}")
  K = S.shape[0]
  S_fixed = jax.lax.stop_gradient(S)
  pair_energy = sample_energy(S_fixed, tau, energy_temp)
  entropy = swapped_entropy(S_fixed, tau)
  every_pair = jnp.ones((K,), bool)
  unit_weight = jnp.ones((K,), S.dtype)
  zero = jnp.zeros((), S.dtype)

  if name == "srem" and not warmup:
    if not use_filtration:
      mask = every_pair
    elif clean is not None:
      mask = jnp.asarray(clean, bool)
      if mask.shape != (K,):
        raise ValueError(f"clean must have shape ({K},), got {mask.shape}")
    else:
      mask = batch_clean_mask(S_fixed, tau, energy_temp, clean_quantile)
    loss_clean, weight = selected_loss(
      S,
      mask.astype(S.dtype),
      entropy,
      kind=clean_loss,
      entropy_use=entropy_use,
      use_entropy=use_entropy_weight,
      tau=tau,
      margin=margin,
      negatives=clean_negatives,
      reduction=clean_reduction,
    )
    if use_cmbcl:
      loss_cmbcl, _ = complementary_loss(S, tau, beta, bias, eps)
    else:
      loss_cmbcl = zero
    loss = loss_clean + cmbcl_weight * loss_cmbcl
  elif name == "triplet_hardest":
    mask, weight = every_pair, unit_weight
    loss_clean, _ = triplet_hardest(S, margin)
    loss_cmbcl = zero
    loss = loss_clean
  elif name == "srem":  # SREM's warm-up
    mask, weight = every_pair, unit_weight
    loss, parts = warmup_loss(
      S,
      warmup_loss_kind,
      tau=tau,
      margin=margin,
      bias=bias,
      eps=eps,
      triplet_weight=warmup_triplet_weight,
    )
    loss_clean, loss_cmbcl = parts["triplet"], parts["ccl"]
  else:  # "ccl"
    mask, weight = every_pair, unit_weight
    loss_clean = zero
    loss_cmbcl, _ = complementary_loss(S, tau, 0.0, bias, eps)
    loss = loss_cmbcl

  aux = {
    "loss": loss,
    "loss_clean": loss_clean,
    "loss_cmbcl": loss_cmbcl,
    "clean_frac": jnp.mean(mask.astype(jnp.float32)),
    "clean": mask,
    "energy": pair_energy,
    "entropy": entropy,
    "weight": weight,
  }
  return loss, aux
