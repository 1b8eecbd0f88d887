"""A few SREM updates of a tiny SGR model on fixed batches, on one or many processes.

Started by tests/test_distributed.py, either alone (one process, all its
devices) or through launch/local.sh (several processes joined by
`srem_jax.distributed`). Every process feeds only its own rows of each global
batch and writes the parameters it ends with to `<out>.process<i>.npz`, so the
test can check that a multi-process run computes what one process computes.

    python tests/distributed_driver.py --out=/tmp/run
"""

import flax
import jax
import ml_collections
import numpy as np
import tiny
from absl import app, flags

from srem_jax import distributed, execution, sharding
from srem_jax.models.sgraf import build_model
from srem_jax.train.step import init_state, make_optimizer, make_train_step

_DISTRIBUTED = distributed.define_flags()
_OUT = flags.DEFINE_string("out", None, "Output prefix of the parameter files.")
_STEPS = flags.DEFINE_integer("steps", 3, "Training steps to run.")

BATCH, REGIONS, FEATURES, CAPTION_LEN, VOCAB = 8, 3, 8, 5, 20


def global_batch_rows(step: int) -> dict[str, np.ndarray]:
  """The whole global batch of `step`, identical on every process."""
  return tiny.random_batch(
    step,
    batch=BATCH,
    regions=REGIONS,
    features=FEATURES,
    caption_len=CAPTION_LEN,
    vocab=VOCAB,
  )


def host_copy(tree) -> dict[str, np.ndarray]:
  """This process's copy of a replicated pytree, keyed by flattened path."""
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  return {k: np.asarray(v.addressable_data(0)) for k, v in flat.items()}


def main(argv):
  del argv
  distributed.initialize(*[flag.value for flag in _DISTRIBUTED])
  mesh = sharding.make_mesh(-1)
  model = build_model(
    tiny.model_config(
      img_dim=FEATURES, embed_dim=8, word_dim=4, sim_dim=4, sgr_steps=1
    ),
    VOCAB,
    execution.resolve(),
  )
  train_cfg = ml_collections.ConfigDict(
    dict(lr=1e-2, lr_decay_epochs=0, lr_decay_factor=0.1, grad_clip=2.0)
  )
  tx = make_optimizer(train_cfg, steps_per_epoch=1)
  state = init_state(
    model,
    tx,
    seed=0,
    num_regions=REGIONS,
    img_dim=FEATURES,
    caption_len=CAPTION_LEN,
    mesh=mesh,
  )
  step_fn = make_train_step(
    model, tx, tiny.loss_options(), mesh, warmup=False, external_selection=False
  )
  # Rows of a global batch follow the mesh's device order, which groups each
  # process's devices together: process i owns one contiguous block.
  initial_params = host_copy(state.params)
  rows = BATCH // jax.process_count()
  first = jax.process_index() * rows
  step_losses = []
  for step in range(_STEPS.value):
    local = {k: v[first : first + rows] for k, v in global_batch_rows(step).items()}
    state, metrics = step_fn(state, sharding.global_batch(local, mesh))
    step_losses.append(float(metrics["loss"]))

  np.savez(
    f"{_OUT.value}.process{jax.process_index()}.npz",
    **{f"params/{k}": v for k, v in host_copy(state.params).items()},
    **{f"initial_params/{k}": v for k, v in initial_params.items()},
    **{f"batch_stats/{k}": v for k, v in host_copy(state.batch_stats).items()},
    losses=np.asarray(step_losses),
    devices=np.asarray([jax.local_device_count(), jax.device_count()]),
  )


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  app.run(main)
