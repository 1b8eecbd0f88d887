"""SREM training: state, sharded update step, epoch loop, resume, final test.

Reads top to bottom: state and optimizer → forward pass over a sharded batch →
update step → selection diagnostics → the loop (validate every epoch, keep the
best, resume from the workdir, stop cleanly on SIGTERM) → final test.

    train.train_and_evaluate(config, workdir="workdirs/demo")
"""

import dataclasses
import functools
import signal
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from srem_jax import (
  checkpoint,
  config_checks,
  diagnostics,
  evaluate,
  gmm,
  losses,
  paths,
  plots,
  resident,
  sharding,
  tensorboard,
)
from srem_jax.data import dataset, pipeline
from srem_jax.errors import UserError
from srem_jax.models.sgraf import SGRAF, build_model
from srem_jax.reporting import Progress, Reporter, recall_table

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


def init_state(model, tx, *, seed, num_regions, img_dim, caption_len, mesh):
  """Parameters created directly with a replicated sharding."""

  def init(rng):
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

  return jax.jit(init, out_shardings=sharding.replicated(mesh))(
    jax.random.PRNGKey(seed)
  )


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
  to every device, so each device scores its own images against all captions
  and no pair is computed twice. Batch statistics are over the global batch.
  """
  img_rng, cap_rng, head_rng = jax.random.split(rng, 3)
  model = sharding.scan_per_device(model, mesh)
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
  cap, _ = _apply(
    model,
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
  scores, batch_stats = _apply(
    model, variables, img, cap, method=SGRAF.score, train=train, rng=head_rng
  )
  return jax.lax.with_sharding_constraint(scores, rows), batch_stats


# ---- update step ------------------------------------------------------------


def loss_options(loss_cfg) -> dict:
  keys = (
    "name tau energy_temp margin clean_quantile use_filtration "
    "use_entropy_weight use_cmbcl beta bias cmbcl_weight eps"
  ).split()
  return {k: loss_cfg[k] for k in keys}


PAIRS = "pairs"


def train_step(state, batch, clean, features=None, *, model, tx, loss_kw, warmup, mesh):
  """One update; `clean` is an externally selected mask or None (static).

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
    loss, aux = losses.objective(scores, warmup=warmup, clean=clean, **loss_kw)
    return loss, (aux, batch_stats)

  grads, (aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  )
  metrics = {k: aux[k] for k in ("loss", "loss_clean", "loss_cmbcl", "clean_frac")}
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics.update(diagnostics.selection_sums(aux, batch["clean"]))
  metrics[PAIRS] = diagnostics.pair_values(aux, batch["clean"])
  return new_state, metrics


def make_train_step(
  model,
  tx,
  loss_kw,
  mesh,
  *,
  warmup: bool,
  external_clean: bool,
  features_on_device: bool = False,
):
  """jit of `train_step`: `(state, batch)`, or `(state, batch, features)`.

  The features are an argument, not a captured constant, so they are neither
  copied into the executable nor donated with the state. Every output is
  replicated, the per-pair values too (a few bytes per pair), so process 0
  reads all of them without a collective of its own.
  """
  step = functools.partial(
    train_step, model=model, tx=tx, loss_kw=loss_kw, warmup=warmup, mesh=mesh
  )

  def clean(batch):
    return batch["selected"] if external_clean else None

  if features_on_device:
    fn = lambda state, batch, features: step(state, batch, clean(batch), features)
  else:
    fn = lambda state, batch: step(state, batch, clean(batch))
  return jax.jit(fn, out_shardings=sharding.replicated(mesh), donate_argnums=(0,))


# ---- the loop ---------------------------------------------------------------


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop saves and exits after the current step."""

  def __init__(self):
    self.signal_name = None

  def install(self):
    self.previous = {s: signal.signal(s, self._handle) for s in _STOP_SIGNALS}

  def restore(self):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name


def _gmm_selection(config, model, state, data, mesh) -> np.ndarray:
  """Epoch-level clean mask per caption from a statistics pass (SPEC §3)."""
  loss_cfg = config.loss
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  stats = evaluate.train_pair_statistics(
    model, variables, data, config, mesh, tau=loss_cfg.tau, temp=loss_cfg.energy_temp
  )
  return gmm.gmm_clean_mask(
    stats["ce"],
    stats["energy"],
    iters=loss_cfg.gmm_iters,
    tol=loss_cfg.gmm_tol,
    reg=loss_cfg.gmm_reg,
    min_noisy=loss_cfg.gmm_min_noisy,
  )


@dataclasses.dataclass
class _Run:
  """Everything the loop needs, opened once at start-up."""

  config: Any
  workdir: str
  mesh: Any
  report: Reporter
  data: dataset.RunData
  loader: Any
  model: SGRAF
  tx: optax.GradientTransformation
  ckpt: checkpoint.Checkpointer
  steps_per_epoch: int
  features: jax.Array | None  # the training images, when kept on the devices
  events: tensorboard.SummaryWriter | None  # process 0's TensorBoard writer

  @property
  def total_steps(self) -> int:
    return self.config.train.epochs * self.steps_per_epoch


def _open_run(config, workdir: str) -> _Run:
  config_checks.validate(config, jax.device_count())
  on_device = resident.features_on_device(config)
  mesh = sharding.make_mesh(config.mesh.data)
  report = Reporter(workdir)
  report.log(f"workdir: {paths.absolute(workdir)}")
  data = dataset.open_data(config, workdir, log=report.log)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if data.noise.path:
    report.log(f"noise ({data.noise.protocol}): {data.noise.path}")
  tcfg = config.train
  loader = pipeline.train_loader(
    data.train,
    data.noise.t2i,
    data.noise.clean,
    global_batch_size=tcfg.batch_size,
    caption_len=data.caption_len,
    seed=tcfg.seed,
    num_workers=config.data.num_workers,
    max_steps_per_epoch=tcfg.steps_per_epoch,
    with_images=not on_device,
  )
  if loader.steps_per_epoch < 1:
    raise UserError(
      f"config train.batch_size={tcfg.batch_size} exceeds the "
      f"{data.train.n_captions} training captions"
    )
  features = None
  if on_device:
    features = resident.resident_features(
      data.train, mesh, config.model.dtype, report.log
    )
  return _Run(
    config=config,
    workdir=workdir,
    mesh=mesh,
    report=report,
    data=data,
    loader=loader,
    model=build_model(config.model, data.vocab_size),
    tx=make_optimizer(tcfg, loader.steps_per_epoch),
    ckpt=checkpoint.Checkpointer(workdir),
    steps_per_epoch=loader.steps_per_epoch,
    features=features,
    events=tensorboard.SummaryWriter.for_workdir(workdir),
  )


def _initial_state(run: _Run):
  """Fresh state, or the latest checkpoint's (state, selection, record)."""
  data = run.data
  state = init_state(
    run.model,
    run.tx,
    seed=run.config.train.seed,
    num_regions=data.train.num_regions,
    img_dim=data.train.feature_dim,
    caption_len=data.caption_len,
    mesh=run.mesh,
  )
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  run.report.log(
    f"model {run.config.model.head.upper()}: {n_params / 1e6:.2f}M parameters; "
    f"{data.train.n_captions} training captions, {run.steps_per_epoch} steps/epoch"
  )
  selection = np.ones((data.train.n_captions,), bool)
  # The model fields travel with the checkpoint so `evaluate` can rebuild it.
  record = {
    "epoch": 0,
    "best_rsum": -1.0,
    "best_epoch": -1,
    "model": run.config.model.to_dict(),
  }
  restored = run.ckpt.restore_latest(state, selection)
  if restored is not None:
    state = jax.device_put(restored.state, sharding.replicated(run.mesh))
    selection = np.asarray(restored.selection)
    run.loader.set_state(restored.data_state)
    record = dict(restored.record)
    run.report.log(f"resumed at step {int(state.step)} (epoch {record['epoch']})")
  return state, selection, record


def _train(run: _Run, state, selection, record, stop: _StopFlag):
  """Epochs until the end (or a stop signal); returns the final state."""
  config, report, ckpt, spe = run.config, run.report, run.ckpt, run.steps_per_epoch
  tcfg = config.train
  loss_kw = loss_options(config.loss)
  use_gmm = config.loss.selection == "epoch_gmm" and config.loss.name == "srem"
  compiled = {}
  progress = Progress(run.total_steps, int(state.step))
  iterator = iter(run.loader)
  step = int(state.step)
  while step < run.total_steps:
    epoch = step // spe
    warmup = config.loss.name == "srem" and epoch < tcfg.warmup_epochs
    external = use_gmm and not warmup
    if (warmup, external) not in compiled:
      compiled[warmup, external] = make_train_step(
        run.model,
        run.tx,
        loss_kw,
        run.mesh,
        warmup=warmup,
        external_clean=external,
        features_on_device=run.features is not None,
      )
    step_fn = compiled[warmup, external]
    sums, pairs = None, diagnostics.PairCollector()
    while step < (epoch + 1) * spe:
      batch = next(iterator)
      if external:
        batch["selected"] = selection[batch["cap_index"]]
      resident = () if run.features is None else (run.features,)
      state, metrics = step_fn(state, sharding.global_batch(batch, run.mesh), *resident)
      step += 1
      step_pairs = metrics.pop(PAIRS)
      if report.is_main:
        pairs.add(step_pairs)
      metrics["steps"] = 1.0
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
      if step % tcfg.log_every_steps == 0 or step % spe == 0:
        summary = diagnostics.epoch_summary(sums)
        diagnostics.check_finite(summary, step, ckpt.latest_dir)
        if report.is_main:
          pairs.flush()
        report.log(
          f"epoch {epoch + 1}/{tcfg.epochs}{' (warm-up)' if warmup else ''} "
          f"{progress.line(step)} | loss {summary['loss']:.4f} "
          f"clean {summary['selected_frac']:.2f} "
          f"prec {summary['selection_precision']:.3f} "
          f"rec {summary['selection_recall']:.3f}"
        )
      every = tcfg.checkpoint_every_steps
      if stop.signal_name or (every and step % every == 0 and step % spe):
        # The sums carry any NaN since the epoch began: never save past one.
        diagnostics.check_finite(diagnostics.epoch_summary(sums), step, ckpt.latest_dir)
        ckpt.save_latest(step, state, run.loader.get_state(), selection, record)
      if stop.signal_name:
        return state
    summary = diagnostics.epoch_summary(sums)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    val = evaluate.evaluate_split(
      run.model,
      variables,
      run.data.val,
      config,
      run.mesh,
      run.data.caption_len,
      run.data.val_images,
    )
    records = [
      {"step": step, "epoch": epoch + 1, "split": "train", "warmup": warmup, **summary},
      {"step": step, "epoch": epoch + 1, "split": "val", **val},
    ]
    for epoch_record in records:
      report.write(epoch_record)
    if report.is_main:
      epoch_pairs = pairs.arrays()
      plots.save_pairs(run.workdir, epoch + 1, **epoch_pairs)
      figures = plots.write_all(run.workdir)
      tensorboard.log_epoch(run.events, records, epoch_pairs, figures)
    record["epoch"] = epoch + 1
    improved = val["rsum"] > record["best_rsum"]
    if improved:
      record.update(best_rsum=val["rsum"], best_epoch=epoch + 1)
      ckpt.save_best(step, state, record)
    report.log(
      f"epoch {epoch + 1}: val rSum {val['rsum']:.1f}"
      f"{' (best)' if improved else ''}, selection precision "
      f"{summary['selection_precision']:.3f} recall {summary['selection_recall']:.3f}"
    )
    if use_gmm and epoch + 1 >= tcfg.warmup_epochs and step < run.total_steps:
      selection = _gmm_selection(config, run.model, state, run.data, run.mesh)
    ckpt.save_latest(step, state, run.loader.get_state(), selection, record)
  return state


def _final_test(run: _Run, state, record) -> dict:
  """Tests the best checkpoint with the dataset's protocol; writes results."""
  config, data = run.config, run.data
  best = run.ckpt.restore_best(state)
  final = best.state if best is not None else state
  variables = {"params": final.params, "batch_stats": final.batch_stats}
  test = evaluate.evaluate_split(
    run.model,
    variables,
    data.test,
    config,
    run.mesh,
    data.caption_len,
    data.test.n_images,
    protocol=config.data.eval_protocol,
  )
  results = {
    "test": test,
    "best_epoch": record["best_epoch"],
    "best_val_rsum": record["best_rsum"],
    "noise": {
      "protocol": data.noise.protocol,
      "ratio": config.noise.ratio,
      "file": data.noise.path,
      "clean_fraction": float(np.mean(data.noise.clean)),
    },
    "config": config.to_dict(),
  }
  step = int(state.step)
  run.report.write({"step": step, "epoch": record["epoch"], "split": "test", **test})
  tensorboard.log_test(run.events, config, test, step)
  path = run.report.write_json("results.json", results)
  rows = test if config.data.eval_protocol == "coco" else {"test": test}
  run.report.log("\n" + recall_table(rows))
  if run.report.is_main:
    run.report.log(plots.summary_table(run.workdir))
  run.report.log(
    f"best epoch {record['best_epoch']} (val rSum {record['best_rsum']:.1f}); "
    f"results in {path}"
  )
  return results


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint).

  On SIGTERM/SIGINT the current step finishes, a checkpoint is saved and
  SystemExit(0) is raised; rerunning the same command resumes.
  """
  run = _open_run(config, workdir)
  stop = _StopFlag()
  stop.install()
  try:
    state, selection, record = _initial_state(run)
    tensorboard.log_config(run.events, config, int(state.step))
    state = _train(run, state, selection, record, stop)
    run.ckpt.wait()
    if stop.signal_name:
      run.report.log(
        f"{stop.signal_name}: saved step {int(state.step)} in "
        f"{run.ckpt.latest_dir}; rerun the same command to resume"
      )
      raise SystemExit(0)
    return _final_test(run, state, record)
  finally:
    stop.restore()
    run.loader.close()
    run.ckpt.close()
    if run.events is not None:
      run.events.close()
