"""The evaluation program: checkpoints in, recalls with the published protocols out.

Loads each checkpoint (a run's workdir, an orbax folder or an NCR .pth.tar)
with its own architecture and scores the split with the evaluator training
uses too (`srem_jax.eval.evaluator`). Several models
(checkpoints, NCR's model A and B from a .pth.tar, or both models of a
`loss.name="ncr"` run) form an ensemble by averaging their similarity
matrices, as SGRAF and NCR do.

    python -m srem_jax.evaluate --config=configs/flickr.py \
        --checkpoint=workdirs/flickr [--checkpoint=other] [--dump_sims=sims.npy]
"""

import os

import jax
import numpy as np
from absl import flags

from srem_jax import checkpoint, cli, config_checks, execution, padding, sharding
from srem_jax.data import dataset, prepared_split
from srem_jax.errors import UserError
from srem_jax.eval import evaluator
from srem_jax.models.sgraf import build_model
from srem_jax.report.reporting import Reporter, recall_table

# ---- command line -----------------------------------------------------------


def _define_flags():
  """Flags exist only when this module is the program."""
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

  # The keys are made while tracing: no host-to-device transfer, so this runs
  # under `jax.transfer_guard("disallow")`.
  def init(*args):
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    return model.init(rngs, *args, train=False)

  return jax.eval_shape(init, images, tokens, lengths)


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


def _models_for(path, config, split, caption_len, torch_model, plan):
  """(model, variables) pairs that one --checkpoint contributes.

  The architecture comes from the checkpoint (its training record, or the
  NCR `opt`), so SGR and SAF checkpoints form an ensemble in one command.
  """
  vocab_size = split.vocab_size
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
  members, record = checkpoint.load_members(path)
  model = build_model(_model_config(config, record.get("model", {})), vocab_size, plan)
  expected = _abstract_variables(model, split, caption_len)
  for variables in members:
    checkpoint.check_shapes(variables, expected, path)
  return [(model, variables) for variables in members]


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
  config_checks.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config.mesh.data)
  plan = execution.resolve(config.execution)
  print(f"execution: {plan.reason}")
  warning = execution.cpu_fallback_warning(config.execution)
  if warning:
    print(warning)
  split_name = split_name or config.data.test_split
  protocol = protocol or config.data.eval_protocol
  prepared_dir = dataset.ensure_prepared(config.data, print, config.progress)
  split = prepared_split.load_prepared(prepared_dir, config.data.name, split_name)
  caption_len = padding.static_length(
    split.max_caption_len, config.data.caption_len, split.split
  )
  models = [
    pair
    for path in checkpoints
    for pair in _models_for(path, config, split, caption_len, torch_model, plan)
  ]
  # Members may differ in architecture (SGR beside SAF): each brings its model.
  evaluate = evaluator.for_config(
    config, models[0][0], split, mesh, plan, caption_len=caption_len,
    num_images=split.n_images, protocol=protocol,
  )  # fmt: skip
  result, sims, _ = evaluate.run(
    [jax.device_put(variables, sharding.replicated(mesh)) for _, variables in models],
    models=[model for model, _ in models],
    return_matrix=True,
  )
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
