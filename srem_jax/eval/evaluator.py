"""The evaluator: one split's retrieval recalls for a model's variables, or for
an ensemble of them.

An `Evaluator` is built once per run and split, with everything that does not
change between calls: the model, the split, the mesh and the resolved
execution plan (its tile sizes and compiler options). `run(variables)` embeds
every image and caption once (`srem_jax.eval.retrieval`), scores all pairs on
the devices and ranks them with the split's protocol;
`run([variables_a, variables_b])` ranks the mean of the members' similarity
matrices, as SGRAF's and NCR's ensembles do. The jitted encoders and scorer
are cached per (model, mesh, plan), so calling it every epoch compiles
nothing new.

    val = evaluator.for_config(config, model, data.val, mesh, plan,
                               caption_len=40, num_images=1000)
    metrics = val.run(variables)
    metrics, sims, cap_to_img = val.run([va, vb], return_matrix=True)
"""

import dataclasses
from typing import Any

import numpy as np

from srem_jax import padding
from srem_jax.eval import metrics, retrieval
from srem_jax.report.reporting import PassProgress


def rank_metrics(sims, cap_to_img, protocol: str = "full") -> dict:
  """Recalls of an (images, captions) matrix: the whole split ("full"), or
  COCO's 5-fold 1K and 5K ("coco")."""
  if protocol == "coco":
    return metrics.coco_protocol(sims, cap_to_img)
  return metrics.retrieval_metrics(sims, cap_to_img)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """All-pairs retrieval of `split`'s first `num_images` images (0: all)."""

  model: Any
  split: Any  # a `PreparedSplit`
  mesh: Any
  plan: Any  # the resolved execution plan (`execution.resolve`)
  caption_len: int  # the run's padded caption length
  buckets: tuple[int, ...]  # caption-length buckets (`padding.bucket_lengths`)
  batch_size: int  # images or captions per encoder call
  num_images: int = 0
  protocol: str = "full"
  show_progress: bool = False
  progress_delay_s: float = 0.0

  @property
  def images(self) -> int:
    return self.num_images or self.split.n_images

  def similarity(self, variables, models=None) -> tuple[np.ndarray, np.ndarray]:
    """(images, captions) float32 scores and the clean image of each caption.

    `variables` is one model's variables or a list of them; `models` gives
    each member its own model (an ensemble of SGR and SAF, say), otherwise
    every member uses the evaluator's. An ensemble's matrix is the mean of
    its members', summed in float64.
    """
    members = variables if isinstance(variables, (list, tuple)) else [variables]
    models = models or [self.model] * len(members)
    total = cap_to_img = None
    for model, member in zip(models, members, strict=True):
      sims, cap_to_img = self._member(model, member)
      if len(members) == 1:
        return sims, cap_to_img
      total = sims.astype(np.float64) if total is None else total + sims
    return (total / len(members)).astype(np.float32), cap_to_img

  def run(self, variables, *, models=None, return_matrix: bool = False):
    """Recalls under `protocol`; with `return_matrix`, (recalls, matrix,
    caption→image index)."""
    sims, cap_to_img = self.similarity(variables, models)
    result = rank_metrics(sims, cap_to_img, self.protocol)
    return (result, sims, cap_to_img) if return_matrix else result

  def _member(self, model, variables):
    emb = retrieval.embed_split(
      model,
      variables,
      self.split,
      self.mesh,
      caption_len=self.caption_len,
      num_images=self.images,
      batch_size=self.batch_size,
      img_tile=self.plan.img_tile,
      cap_tile=self.plan.cap_tile,
      buckets=self.buckets,
      plan=self.plan,
    )
    progress = PassProgress(
      f"{self.split.split} scoring",
      None,
      "tiles",
      items=(emb.num_images * len(emb.cap_to_img), "pairs"),
      enabled=self.show_progress,
      delay_s=self.progress_delay_s,
    )
    sims = retrieval.score_embedded(
      model, variables, emb, self.mesh, progress, plan=self.plan
    )
    return sims, emb.cap_to_img


def for_config(
  config, model, split, mesh, plan, *, caption_len, num_images=0, protocol="full"
) -> Evaluator:
  """An evaluator with the sizes a run's (checked) config gives: the eval
  batch, the caption buckets of `data.caption_len`, the progress lines."""
  return Evaluator(
    model=model,
    split=split,
    mesh=mesh,
    plan=plan,
    caption_len=caption_len,
    buckets=padding.bucket_lengths(caption_len, config.data.caption_len),
    batch_size=config.eval.batch_size,
    num_images=num_images,
    protocol=protocol,
    show_progress=config.progress.enabled,
    progress_delay_s=config.progress.delay_s,
  )
