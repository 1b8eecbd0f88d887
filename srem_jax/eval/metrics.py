"""Retrieval metrics from an (images × captions) similarity matrix
(docs/method.md §Evaluation).

`sims[i, k]` scores image i against caption k and `cap_to_img[k]` is the
ground-truth image of caption k. Image→text ranks each image's captions and
keeps the best-ranked of its ground-truth captions; text→image ranks the images
for each caption. R@K is the percentage of queries whose rank is below K,
rSum the sum of the six recalls, medr/meanr the 1-based median (floored, as in
VSE++) and mean rank.

Ties count against the ground truth: a query's 0-based rank is the number of
non-ground-truth candidates scoring >= its best ground-truth score. A constant
matrix therefore gets the worst possible ranks, never a perfect recall.

The matrix is processed in chunks of rows (image→text) or columns
(text→image) so a 5,000 × 25,000 evaluation needs only a few block-sized
temporaries besides `sims` itself.

    metrics = retrieval_metrics(sims, cap_to_img)   # {"i2t_r1": ..., "rsum": ...}
    both = coco_protocol(sims, cap_to_img)          # {"coco1k": ..., "coco5k": ...}
"""

import numpy as np

from srem_jax.errors import UserError

_BLOCK_ELEMENTS = 1 << 22
_COCO_FOLDS = 5


def _checked(sims, cap_to_img):
  sims = np.asarray(sims)
  cap_to_img = np.asarray(cap_to_img)
  if sims.ndim != 2:
    raise UserError(
      f"sims: expected an (images, captions) matrix, got shape {sims.shape}"
    )
  n_img, n_cap = sims.shape
  if cap_to_img.shape != (n_cap,) or not np.issubdtype(cap_to_img.dtype, np.integer):
    raise UserError(
      f"cap_to_img: expected {n_cap} integer image indices (one per caption column),"
      f" got {cap_to_img.dtype} of shape {cap_to_img.shape}"
    )
  if n_cap and (cap_to_img.min() < 0 or cap_to_img.max() >= n_img):
    raise UserError(f"cap_to_img: image indices must lie in [0, {n_img})")
  return sims, cap_to_img.astype(np.int64)


def _finite(block):
  if not np.all(np.isfinite(block)):
    raise UserError("sims: contains NaN or infinity; cannot rank")
  return block


def i2t_ranks(sims, cap_to_img, *, chunk=None):
  """0-based rank of the best-ranked ground-truth caption of each image, (N_img,)."""
  sims, cap_to_img = _checked(sims, cap_to_img)
  n_img, n_cap = sims.shape
  if np.bincount(cap_to_img, minlength=n_img).min(initial=1) == 0:
    raise UserError("cap_to_img: every image needs at least one ground-truth caption")
  chunk = chunk or max(1, _BLOCK_ELEMENTS // max(n_cap, 1))
  ranks = np.empty(n_img, np.int64)
  for start in range(0, n_img, chunk):
    block = _finite(sims[start : start + chunk])
    images = np.arange(start, start + block.shape[0])
    is_gt = cap_to_img[None, :] == images[:, None]
    best_gt = np.where(is_gt, block, -np.inf).max(axis=1)
    outranking = (block >= best_gt[:, None]) & ~is_gt
    ranks[start : start + block.shape[0]] = outranking.sum(axis=1)
  return ranks


def t2i_ranks(sims, cap_to_img, *, chunk=None):
  """0-based rank of the ground-truth image of each caption, (N_cap,)."""
  sims, cap_to_img = _checked(sims, cap_to_img)
  n_img, n_cap = sims.shape
  chunk = chunk or max(1, _BLOCK_ELEMENTS // max(n_img, 1))
  ranks = np.empty(n_cap, np.int64)
  for start in range(0, n_cap, chunk):
    block = _finite(sims[:, start : start + chunk])
    columns = np.arange(block.shape[1])
    gt_score = block[cap_to_img[start : start + block.shape[1]], columns]
    # The ground-truth image itself always satisfies >=; everything else that
    # does outranks it.
    ranks[start : start + block.shape[1]] = (block >= gt_score[None, :]).sum(axis=0) - 1
  return ranks


def retrieval_metrics(sims, cap_to_img):
  """R@1/5/10 (percent) both ways, rsum, and 1-based medr/meanr both ways."""
  ranks = {"i2t": i2t_ranks(sims, cap_to_img), "t2i": t2i_ranks(sims, cap_to_img)}
  metrics = {
    f"{direction}_r{k}": 100.0 * float(np.mean(r < k))
    for direction, r in ranks.items()
    for k in (1, 5, 10)
  }
  metrics["rsum"] = sum(metrics.values())
  for direction, r in ranks.items():
    metrics[f"{direction}_medr"] = float(np.floor(np.median(r)) + 1)
    metrics[f"{direction}_meanr"] = float(r.mean() + 1)
  return metrics


def coco_protocol(sims, cap_to_img):
  """COCO's two protocols: the mean over 5 consecutive image folds, and the whole.

  Fold f holds images `[f·n/5, (f+1)·n/5)` and the captions whose ground truth
  lies among them (1,000 images / 5,000 captions on COCO `testall`).
  """
  sims, cap_to_img = _checked(sims, cap_to_img)
  n_img = sims.shape[0]
  if n_img == 0 or n_img % _COCO_FOLDS:
    raise UserError(
      f"sims: the COCO protocol needs a number of images divisible into"
      f" {_COCO_FOLDS} folds, got {n_img}"
    )
  fold_size = n_img // _COCO_FOLDS
  per_fold = []
  for fold in range(_COCO_FOLDS):
    first = fold * fold_size
    captions = np.flatnonzero((cap_to_img >= first) & (cap_to_img < first + fold_size))
    fold_sims = sims[first : first + fold_size][:, captions]
    per_fold.append(retrieval_metrics(fold_sims, cap_to_img[captions] - first))
  coco1k = {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}
  return {"coco1k": coco1k, "coco5k": retrieval_metrics(sims, cap_to_img)}
