"""The training state, the forward pass over a sharded batch and the update step.

Owns `TrainState`, `make_optimizer`, `init_state`, `batch_scores` and
`make_train_step`: everything a step needs and nothing of the loop around it
(no input pipeline, checkpoints or logging), so a benchmark or an
ahead-of-time compile imports it without the data stack.

    tx = make_optimizer(config.train, steps_per_epoch)
    state = init_state(model, tx, seed=0, num_regions=36, img_dim=2048,
                       caption_len=40, mesh=mesh)
    step = make_train_step(model, tx, loss_options(config.loss), mesh,
                           warmup=False, external_selection=False)
    state, metrics = step(state, batch)
"""

import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from srem_jax import execution, sharding
from srem_jax.data import resident
from srem_jax.methods import losses, readings
from srem_jax.models.sgraf import SGRAF
from srem_jax.report import diagnostics

# ---- state and optimizer ----------------------------------------------------


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def make_optimizer(train_cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  boundary = train_cfg.lr_decay_epochs * steps_per_epoch
  schedule = optax.piecewise_constant_schedule(
    train_cfg.lr, {boundary: train_cfg.lr_decay_factor} if boundary > 0 else {}
  )
  return optax.chain(
    optax.clip_by_global_norm(train_cfg.grad_clip), optax.adam(schedule)
  )


def init_state(model, tx, *, seed, num_regions, img_dim, caption_len, mesh, plan=None):
  """Parameters created directly with a replicated sharding.

  The key, like every other array here, is made inside `jit`: nothing crosses
  from the host, so this runs under `jax.transfer_guard("disallow")`. The
  init runs the head, so it compiles with the `plan`'s compiler options
  (`execution.compiler_options`), as the step does.
  """

  def init():
    rng = jax.random.PRNGKey(seed)
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    images = jnp.zeros((2, num_regions, img_dim), jnp.float32)
    tokens = jnp.ones((2, caption_len), jnp.int32)
    lengths = jnp.full((2,), caption_len, jnp.int32)
    variables = model.init(
      {"params": params_rng, "dropout": dropout_rng},
      images,
      tokens,
      lengths,
      train=False,
    )
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      rng=state_rng,
    )

  return jax.jit(
    init,
    out_shardings=sharding.replicated(mesh),
    compiler_options=execution.compiler_options(plan),
  )()


def model_variables(state) -> dict:
  """The variables a model is applied with (and evaluated with) from a state."""
  return {"params": state.params, "batch_stats": state.batch_stats}


# ---- forward pass over a sharded batch --------------------------------------


def _apply(model, variables, *args, method, train, rng):
  if not train:
    return model.apply(variables, *args, train=False, method=method), variables[
      "batch_stats"
    ]
  out, updates = model.apply(
    variables,
    *args,
    train=True,
    method=method,
    mutable=["batch_stats"],
    rngs={"dropout": rng},
  )
  return out, updates["batch_stats"]


def batch_scores(model, params, batch_stats, batch, *, train, rng, mesh):
  """The K×K similarity matrix of a global batch, each device scoring its rows.

  Images stay sharded along `data`; the (small) caption embeddings are gathered
  to every device, and the head runs under `shard_map`: each device scores its
  own images against all captions with no communication inside its scan, no
  pair is computed twice, and the gradients of the replicated inputs
  (parameters, captions) are summed over devices once, after the scan. Batch
  statistics are over the global batch (SAF's per-caption ones are summed
  over the data axis inside the head).
  """
  img_rng, cap_rng, head_rng = jax.random.split(rng, 3)
  variables = {"params": params, "batch_stats": batch_stats}
  img, batch_stats = _apply(
    model,
    variables,
    batch["images"],
    method=SGRAF.encode_images,
    train=train,
    rng=img_rng,
  )
  variables = {"params": params, "batch_stats": batch_stats}
  axis = sharding.DATA_AXIS
  local_model = model.clone(axis_name=axis)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for the GRU's shard_map
    cap, _ = _apply(
      local_model,
      variables,
      batch["tokens"],
      batch["lengths"],
      method=SGRAF.encode_captions,
      train=train,
      rng=cap_rng,
    )
  rows = NamedSharding(mesh, P("data"))
  img = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows), img)
  cap = jax.tree.map(
    lambda x: jax.lax.with_sharding_constraint(x, sharding.replicated(mesh)), cap
  )

  def local_scores(variables, img, cap):
    # Parameters and captions enter as device-varying values here, once, so
    # their cotangents are summed over devices once, after the backward scan,
    # not in every scan step (and the head's custom VJPs see one type).
    vary = lambda tree: jax.tree.map(
      lambda x: jax.lax.pcast(x, axis, to="varying"), tree
    )
    variables = {**variables, "params": vary(variables["params"])}
    return _apply(
      local_model,
      variables,
      img,
      vary(cap),
      method=SGRAF.score,
      train=train,
      rng=head_rng,
    )

  score = jax.shard_map(
    local_scores,
    mesh=mesh,
    in_specs=(P(), P(sharding.DATA_AXIS), P()),
    out_specs=(P(sharding.DATA_AXIS), P()),
  )
  return score(variables, img, cap)


# ---- update step ------------------------------------------------------------


def loss_options(loss_cfg) -> dict:
  """`losses.objective`'s keyword arguments from `config.loss`, the reading's
  components resolved (`readings.resolve`); the selection is the loop's."""
  keys = (
    "name tau energy_temp margin clean_quantile use_filtration "
    "use_entropy_weight use_cmbcl beta bias cmbcl_weight eps"
  ).split()
  components = readings.resolve(loss_cfg)
  return {
    **{k: loss_cfg[k] for k in keys},
    "warmup_loss_kind": components["warmup"],
    "warmup_triplet_weight": components["warmup_triplet_weight"],
    "clean_loss": components["clean_loss"],
    "entropy_use": components["entropy_use"],
    "clean_negatives": components["clean_negatives"],
    "clean_reduction": components["clean_reduction"],
  }


PAIRS = "pairs"
# The metrics the loop sums over an epoch's steps (`steps` counts them).
SUMMED = (
  "loss loss_clean loss_cmbcl trained_clean_frac grad_norm n trained_clean "
  "trained_truly_clean truly_clean energy_clean energy_noisy entropy_clean "
  "entropy_noisy steps"
).split()


def zero_sums(mesh) -> dict:
  """Replicated float32 zeros for each of `SUMMED`: the sums of no step."""
  zeros = {key: np.zeros((), np.float32) for key in SUMMED}
  return jax.device_put(zeros, sharding.replicated(mesh))


def add_to_sums(sums: dict, metrics: dict) -> dict:
  """`sums` plus one step's scalar `metrics` (without `PAIRS`) and one step."""
  metrics = {**metrics, "steps": jnp.ones((), jnp.float32)}
  return jax.tree.map(lambda s, m: s + m.astype(s.dtype), sums, metrics)


def train_step(
  state, batch, selected, features=None, *, model, tx, loss_kw, warmup, mesh
):
  """One update; `selected` is the epoch's selection of clean-looking pairs
  for this batch, or None (static) when the loss selects within the batch.

  Three masks meet here and keep apart: `selected` (the selection given to
  the loss), `batch["truly_clean"]` (the injected truth, for diagnostics
  only) and the loss's `aux["clean"]`, the pairs it trained as clean
  (`trained_clean` in the metrics).

  With `features` (every training image, replicated) the batch carries no
  `images`: they are gathered from it by `img_index`. `metrics[PAIRS]` holds
  each pair's energy, swapped entropy and truth, to be kept, not summed.
  """
  if features is not None:
    batch = {
      **batch,
      "images": resident.gather_images(features, batch["img_index"], mesh),
    }
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    scores, batch_stats = batch_scores(
      model, params, state.batch_stats, batch, train=True, rng=rng, mesh=mesh
    )
    loss, aux = losses.objective(scores, warmup=warmup, clean=selected, **loss_kw)
    return loss, (aux, batch_stats)

  grads, (aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  )
  metrics = {k: aux[k] for k in ("loss", "loss_clean", "loss_cmbcl")}
  metrics["trained_clean_frac"] = aux["clean_frac"]
  metrics["grad_norm"] = optax.global_norm(grads)
  truly_clean = batch["truly_clean"]
  metrics.update(diagnostics.selection_sums(aux, truly_clean))
  metrics[PAIRS] = diagnostics.pair_values(aux, truly_clean)
  return new_state, metrics


def make_train_step(
  model,
  tx,
  loss_kw,
  mesh,
  *,
  warmup: bool,
  external_selection: bool,
  features_on_device: bool = False,
  summed: bool = False,
  plan=None,
):
  """jit of `train_step`: `(state, batch)`, or `(state, batch, features)`,
  compiled with the execution `plan`'s compiler options (None: XLA's).

  The features are an argument, not a captured constant, so they are neither
  copied into the executable nor donated with the state. Every output is
  replicated, the per-pair values too (a few bytes per pair), so process 0
  reads all of them without a collective of its own.

  With `summed`, the first argument and output is `(state, sums)` instead of
  `state`, the step adds its metrics to `sums` (see `zero_sums`) and returns
  only `metrics[PAIRS]` beside it: the loop then runs no operation of its own
  per step and reads the sums when it logs. Both are donated.
  """
  step = functools.partial(
    train_step, model=model, tx=tx, loss_kw=loss_kw, warmup=warmup, mesh=mesh
  )

  def selected(batch):
    return batch["selected"] if external_selection else None

  def fn(state, batch, *features):
    return step(state, batch, selected(batch), *features)

  if summed:
    plain = fn

    def fn(carry, batch, *features):
      state, sums = carry
      state, metrics = plain(state, batch, *features)
      pairs = metrics.pop(PAIRS)
      return (state, add_to_sums(sums, metrics)), pairs

  if features_on_device:
    jitted = lambda state, batch, features: fn(state, batch, features)
  else:
    jitted = lambda state, batch: fn(state, batch)
  return jax.jit(
    jitted,
    out_shardings=sharding.replicated(mesh),
    donate_argnums=(0,),
    compiler_options=execution.compiler_options(plan),
  )


class TimedJit:
  """A jitted function compiled ahead of time once per argument shapes, with
  the jit's compiler options (any other callable is just called); the
  seconds spent compiling add up in `compile_s`, so a loop can report the
  time of its steps without their compilation."""

  def __init__(self, jitted):
    self.jitted = jitted
    self.compiled = {}
    self.compile_s = 0.0

  def __call__(self, *args):
    if not hasattr(self.jitted, "lower"):  # a plain function: called as it is
      return self.jitted(*args)
    leaves, tree = jax.tree.flatten(args)
    key = tree, tuple((x.shape, x.dtype) for x in leaves)
    fn = self.compiled.get(key)
    if fn is None:
      start = time.perf_counter()
      fn = self.compiled[key] = self.jitted.lower(*args).compile()
      self.compile_s += time.perf_counter() - start
    return fn(*args)


def compile_seconds(fns) -> float:
  """Seconds the `TimedJit`s among `fns` spent compiling (others count 0)."""
  return sum(getattr(fn, "compile_s", 0.0) for fn in fns)
