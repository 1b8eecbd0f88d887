"""Retrieval evaluation with the published protocols, alone or inside training.

Each image and caption of a split is embedded exactly once (padded batches
carry a mask), the all-pairs SGRAF scores are computed tile by tile with the
image rows of a tile spread over the devices, and recalls are ranked by
`metrics`. Several models (checkpoints, or NCR's model A and B) form an
ensemble by averaging their similarity matrices, as SGRAF does.

    python -m srem_jax.evaluate --config=configs/flickr.py \
        --checkpoint=workdirs/flickr [--checkpoint=other] [--dump_sims=sims.npy]
"""

import functools
import os

import jax
import numpy as np
from absl import flags

from srem_jax import checkpoint, cli, execution, losses, metrics, padding, sharding
from srem_jax.data import dataset, pipeline
from srem_jax.errors import UserError
from srem_jax.models import tiling
from srem_jax.models.sgraf import SGRAF, CaptionEmbedding, ImageEmbedding, build_model
from srem_jax.reporting import PassProgress, Reporter, recall_table


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _to_host(tree):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


@functools.lru_cache(maxsize=8)
def _eval_functions(model, mesh):
  """Jitted encoders and scorer, built once per (model, mesh).

  Validation runs every epoch; fresh lambdas each time would recompile all
  three functions every epoch. Linen modules hash by their fields.
  """
  rows = sharding.data_sharding(mesh)
  full = sharding.replicated(mesh)
  encode_images = jax.jit(
    lambda v, x: model.apply(v, x, train=False, method=SGRAF.encode_images)
  )
  encode_captions = jax.jit(
    lambda v, t, n: model.apply(v, t, n, train=False, method=SGRAF.encode_captions)
  )
  score = jax.jit(
    lambda v, i, c: model.apply(v, i, c, train=False, method=SGRAF.score),
    in_shardings=(full, rows, full),
    out_shardings=full,
  )
  return encode_images, encode_captions, score


def embed_split(model, variables, split, config, mesh, caption_len, num_images):
  """Embeds the first `num_images` images and their captions, each once."""
  devices = mesh.devices.size
  batch_size = _round_up(config.eval.batch_size, devices)
  pindex, pcount = jax.process_index(), jax.process_count()

  encode_images, encode_captions, _ = _eval_functions(model, mesh)
  parts = []
  for batch in pipeline.image_batches(
    split, batch_size, num_images=num_images, process_index=pindex, process_count=pcount
  ):
    gb = sharding.global_batch(batch, mesh)
    emb, mask = _to_host((encode_images(variables, gb["images"]), gb["mask"]))
    parts.append(jax.tree.map(lambda x: x[mask], emb))
  img = ImageEmbedding(*(np.concatenate(x) for x in zip(*parts)))
  parts, cap_to_img = [], []
  for batch in pipeline.caption_batches(
    split,
    batch_size,
    caption_len,
    num_images=num_images,
    process_index=pindex,
    process_count=pcount,
  ):
    gb = sharding.global_batch(batch, mesh)
    emb, mask, owner = _to_host(
      (
        encode_captions(variables, gb["tokens"], gb["lengths"]),
        gb["mask"],
        gb["img_index"],
      )
    )
    parts.append(jax.tree.map(lambda x: x[mask], emb))
    cap_to_img.append(owner[mask])
  cap = CaptionEmbedding(*(np.concatenate(x) for x in zip(*parts)))
  return img, cap, np.concatenate(cap_to_img)


def similarity_matrix(model, variables, split, config, mesh, caption_len, num_images):
  """(num_images, their captions) scores and the clean caption→image index."""
  img, cap, cap_to_img = embed_split(
    model, variables, split, config, mesh, caption_len, num_images
  )
  rows = sharding.data_sharding(mesh)
  full = sharding.replicated(mesh)
  plan = execution.resolve(config.execution)
  img_tile = _round_up(plan.img_tile, mesh.devices.size)
  score = _eval_functions(model, mesh)[2]

  def place(tree, where):
    # Global arrays built from host tiles work on one process and on many.
    return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, where, lambda idx: x[idx]), tree
    )

  progress = PassProgress(
    f"{split.split} scoring",
    None,
    "tiles",
    items=(img[0].shape[0] * cap[0].shape[0], "pairs"),
    enabled=config.progress.enabled,
    delay_s=config.progress.delay_s,
  )
  # Tiles of short captions keep only their bucket's word positions.
  buckets = padding.bucket_lengths(caption_len, config.data.caption_len)
  sims = tiling.score_all(
    lambda i, c: score(variables, place(i, rows), place(c, full)),
    img,
    cap,
    img_tile=img_tile,
    cap_tile=plan.cap_tile,
    progress=progress,
    cap_lengths=cap.mask.sum(axis=1),
    buckets=buckets if len(buckets) > 1 else None,
  )
  return sims, cap_to_img


def rank_metrics(sims, cap_to_img, protocol: str = "full") -> dict:
  if protocol == "coco":
    return metrics.coco_protocol(sims, cap_to_img)
  return metrics.retrieval_metrics(sims, cap_to_img)


def evaluate_split(
  model, variables, split, config, mesh, caption_len, num_images, protocol="full"
) -> dict:
  sims, cap_to_img = similarity_matrix(
    model, variables, split, config, mesh, caption_len, num_images
  )
  return rank_metrics(sims, cap_to_img, protocol)


@functools.lru_cache(maxsize=4)
def _statistics_function(model, tau, temp):
  """Jitted per-sample statistics, built once per model (called every epoch)."""

  def stats(v, batch):
    scores = model.apply(
      v, batch["images"], batch["tokens"], batch["lengths"], train=False
    )
    return losses.per_sample_stats(scores, tau, temp, valid=batch["mask"])

  return jax.jit(stats)


def train_pair_statistics(model, variables, data, config, mesh, *, tau, temp):
  """Per-caption in-batch cross-entropy, energy and swapped entropy over the
  training set, as {"ce", "energy", "entropy"} arrays indexed by caption.

  Batches follow a seeded order of the whole (noisy) training set; the last
  one is padded and its padding masked out of every softmax.
  """
  devices = mesh.devices.size
  batch_size = _round_up(config.train.batch_size, devices)
  n = data.train.n_captions
  out = {key: np.zeros(n, np.float32) for key in ("ce", "energy", "entropy")}

  stats = _statistics_function(model, tau, temp)
  progress = PassProgress(
    "selection statistics",
    _round_up(n, batch_size) // batch_size,
    "batches",
    items=(n, "pairs"),
    enabled=config.progress.enabled,
    delay_s=config.progress.delay_s,
  )
  batches = pipeline.pair_batches(
    data.train,
    data.noise.t2i,
    batch_size,
    data.caption_len,
    seed=config.train.seed,
    buckets=data.buckets,
  )
  for done, batch in enumerate(batches, 1):
    values = _to_host(stats(variables, sharding.global_batch(batch, mesh)))
    keep = batch["mask"]
    for key, column in out.items():
      column[batch["cap_index"][keep]] = values[key][keep]
    progress(done)
  return out


# ---- command line -----------------------------------------------------------


def _define_flags():
  """Flags exist only when this module is the program (train imports it too)."""
  return dict(
    config=cli.define_config_flag(),
    checkpoint=flags.DEFINE_multi_string(
      "checkpoint",
      [],
      "Run workdir, orbax checkpoint folder or NCR .pth.tar (repeatable).",
    ),
    split=flags.DEFINE_string(
      "split", None, "Split to evaluate (default data.test_split)."
    ),
    protocol=flags.DEFINE_enum(
      "protocol", None, ["full", "coco"], "full, or coco (5-fold 1K and 5K)."
    ),
    torch_model=flags.DEFINE_enum(
      "torch_model", "AB", ["A", "B", "AB"], "Model(s) of an NCR checkpoint to use."
    ),
    dump_sims=flags.DEFINE_string("dump_sims", None, "Write the ranked matrix (.npy)."),
    workdir=flags.DEFINE_string(
      "workdir", None, "Output folder (default <first checkpoint>/eval_<split>)."
    ),
  )


def _abstract_variables(model, split, caption_len):
  """Shapes of the model's variables for this split, computed without FLOPs."""
  images = jax.ShapeDtypeStruct((2, split.num_regions, split.feature_dim), np.float32)
  tokens = jax.ShapeDtypeStruct((2, caption_len), np.int32)
  lengths = jax.ShapeDtypeStruct((2,), np.int32)
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  return jax.eval_shape(
    lambda *args: model.init(rngs, *args, train=False), images, tokens, lengths
  )


# Fields that define the trained network; dtype, chunking and remat stay the
# caller's choice at evaluation time.
_ARCHITECTURE = (
  "head",
  "img_dim",
  "embed_dim",
  "word_dim",
  "sim_dim",
  "sgr_steps",
  "smooth",
)


def _model_config(config, overrides):
  model_cfg = config.model.copy_and_resolve_references()
  with model_cfg.unlocked():
    for key in _ARCHITECTURE:
      if key in overrides:
        model_cfg[key] = overrides[key]
  return model_cfg


def _models_for(path, config, split, caption_len, torch_model):
  """(model, variables) pairs that one --checkpoint contributes.

  The architecture comes from the checkpoint (its training record, or the
  NCR `opt`), so SGR and SAF checkpoints form an ensemble in one command.
  """
  vocab_size = split.vocab_size
  plan = execution.resolve(config.execution)
  if path.endswith((".pth", ".pth.tar", ".tar")):
    from srem_jax.models import torch_import  # needs the optional torch extra

    pairs = []
    for overrides, variables in torch_import.load_torch_checkpoint(path, torch_model):
      vocab = overrides.get("vocab_size", vocab_size)
      if vocab != vocab_size:
        raise UserError(
          f"{path}: the checkpoint's vocabulary has {vocab} words but the "
          f"prepared data uses {vocab_size}; use the vocabulary it was trained with"
        )
      model = build_model(_model_config(config, overrides), vocab_size, plan)
      pairs.append((model, variables))
    return pairs
  variables, record = checkpoint.load_variables(path)
  model = build_model(_model_config(config, record.get("model", {})), vocab_size, plan)
  expected = _abstract_variables(model, split, caption_len)
  checkpoint.check_shapes(variables, expected, path)
  return [(model, variables)]


def run_evaluation(
  config,
  checkpoints,
  *,
  split_name=None,
  protocol=None,
  torch_model="AB",
  dump_sims=None,
  workdir=None,
) -> dict:
  """Evaluates one model or an ensemble; writes results.json and metrics.jsonl."""
  if not checkpoints:
    raise UserError(
      "--checkpoint is required (a run workdir, checkpoint folder or .pth.tar)"
    )
  mesh = sharding.make_mesh(config.mesh.data)
  print(f"execution: {execution.resolve(config.execution).reason}")
  warning = execution.cpu_fallback_warning(config.execution)
  if warning:
    print(warning)
  split_name = split_name or config.data.test_split
  protocol = protocol or config.data.eval_protocol
  prepared_dir = dataset.ensure_prepared(config.data, print, config.progress)
  split = pipeline.load_prepared(prepared_dir, config.data.name, split_name)
  caption_len = max(config.data.caption_len, split.max_caption_len)
  models = [
    pair
    for path in checkpoints
    for pair in _models_for(path, config, split, caption_len, torch_model)
  ]
  total = None
  for model, variables in models:
    variables = jax.device_put(variables, sharding.replicated(mesh))
    sims, cap_to_img = similarity_matrix(
      model, variables, split, config, mesh, caption_len, split.n_images
    )
    total = sims.astype(np.float64) if total is None else total + sims
  sims = (total / len(models)).astype(np.float32)
  result = rank_metrics(sims, cap_to_img, protocol)
  first = os.path.abspath(checkpoints[0])
  base = first if os.path.isdir(first) else os.path.dirname(first)
  workdir = workdir or os.path.join(base, f"eval_{split_name}")
  os.makedirs(workdir, exist_ok=True)
  if dump_sims:
    np.save(dump_sims, sims)
    print(f"similarity matrix {sims.shape} written to {dump_sims}")
  record = {
    "split": split_name,
    "protocol": protocol,
    "checkpoints": list(checkpoints),
    "ensemble_size": len(models),
    **result,
  }
  report = Reporter(workdir)
  report.write(record)
  path = report.write_json("results.json", record)
  print(recall_table(result if protocol == "coco" else {split_name: result}))
  print(f"results in {path}")
  return record


def main(argv, flag_values):
  del argv
  config = flag_values["config"].value
  if config is None:
    raise UserError("--config is required, e.g. --config=configs/flickr.py")
  run_evaluation(
    config,
    flag_values["checkpoint"].value,
    split_name=flag_values["split"].value,
    protocol=flag_values["protocol"].value,
    torch_model=flag_values["torch_model"].value,
    dump_sims=flag_values["dump_sims"].value,
    workdir=flag_values["workdir"].value,
  )


if __name__ == "__main__":
  _flag_values = _define_flags()
  cli.run(lambda argv: main(argv, _flag_values))
