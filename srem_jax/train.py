"""SREM training: state, sharded update step, epoch loop, resume, final test.

Reads top to bottom: state and optimizer → forward pass over a sharded batch →
update step → selection diagnostics → the loop (validate every epoch, keep the
best, resume from the workdir, stop cleanly on SIGTERM) → final test.

    train.train_and_evaluate(config, workdir="workdirs/demo")
"""

import functools
import math
import os
import signal
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from srem_jax import checkpoint, config_checks, evaluate, gmm, losses, sharding
from srem_jax.data import dataset, pipeline
from srem_jax.errors import UserError
from srem_jax.models.sgraf import SGRAF, build_model
from srem_jax.reporting import Progress, Reporter, format_duration, recall_table

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


def selection_sums(aux, truth_clean) -> dict:
  """Per-batch sums from which epoch precision/recall and means are formed."""
  chosen = aux["clean"].astype(jnp.float32)
  truth = truth_clean.astype(jnp.float32)
  return {
    "n": jnp.asarray(truth.shape[0], jnp.float32),
    "selected": chosen.sum(),
    "selected_true": (chosen * truth).sum(),
    "true_clean": truth.sum(),
    "energy_clean": (aux["energy"] * truth).sum(),
    "energy_noisy": (aux["energy"] * (1 - truth)).sum(),
    "entropy_clean": (aux["entropy"] * truth).sum(),
    "entropy_noisy": (aux["entropy"] * (1 - truth)).sum(),
  }


def train_step(state, batch, clean, *, model, tx, loss_kw, warmup, mesh):
  """One update; `clean` is an externally selected mask or None (static)."""
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
  metrics.update(selection_sums(aux, batch["clean"]))
  return new_state, metrics


def make_train_step(model, tx, loss_kw, mesh, *, warmup: bool, external_clean: bool):
  step = functools.partial(
    train_step, model=model, tx=tx, loss_kw=loss_kw, warmup=warmup, mesh=mesh
  )
  if not external_clean:
    fn = lambda state, batch: step(state, batch, None)
  else:
    fn = lambda state, batch: step(state, batch, batch["selected"])
  return jax.jit(fn, out_shardings=sharding.replicated(mesh), donate_argnums=(0,))


def epoch_summary(sums: dict) -> dict:
  """Epoch diagnostics from accumulated `selection_sums` and loss sums."""
  s = {k: float(v) for k, v in sums.items()}
  steps = max(s.pop("steps"), 1.0)
  noisy = s["n"] - s["true_clean"]
  out = {k: s[k] / steps for k in ("loss", "loss_clean", "loss_cmbcl", "grad_norm")}
  out.update(
    selected_frac=s["selected"] / max(s["n"], 1),
    selection_precision=s["selected_true"] / s["selected"] if s["selected"] else 0.0,
    selection_recall=s["selected_true"] / s["true_clean"] if s["true_clean"] else 0.0,
    energy_clean=s["energy_clean"] / s["true_clean"] if s["true_clean"] else math.nan,
    energy_noisy=s["energy_noisy"] / noisy if noisy else math.nan,
    entropy_clean=s["entropy_clean"] / s["true_clean"] if s["true_clean"] else math.nan,
    entropy_noisy=s["entropy_noisy"] / noisy if noisy else math.nan,
  )
  return out


# ---- the loop ---------------------------------------------------------------


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop saves and exits after the current step."""

  def __init__(self):
    self.signal_name = None

  def install(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name


def _check_finite(summary: dict, step: int, ckpt_dir: str) -> None:
  terms = {k: summary[k] for k in ("loss", "loss_clean", "loss_cmbcl")}
  if all(math.isfinite(v) for v in terms.values()):
    return
  text = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
  raise UserError(
    f"non-finite loss by step {step} ({text}); the last good checkpoint in "
    f"{ckpt_dir} is kept: rerun the same command with a lower learning rate, "
    "e.g. --config.train.lr=1e-4, to resume from it"
  )


def _gmm_selection(config, model, state, data, mesh) -> np.ndarray:
  """Epoch-level clean mask per caption from a statistics pass (SPEC §3)."""
  loss_cfg = config.loss
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  ce, energy = evaluate.train_set_statistics(
    model, variables, data, config, mesh, tau=loss_cfg.tau, temp=loss_cfg.energy_temp
  )
  return gmm.gmm_clean_mask(
    ce,
    energy,
    iters=loss_cfg.gmm_iters,
    tol=loss_cfg.gmm_tol,
    reg=loss_cfg.gmm_reg,
    min_noisy=loss_cfg.gmm_min_noisy,
  )


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint)."""
  config_checks.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh.data)
  report = Reporter(workdir)
  report.log(f"workdir: {os.path.abspath(workdir)}")
  data = dataset.open_data(config, workdir, log=report.log)
  os.makedirs(workdir, exist_ok=True)
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
  )
  steps_per_epoch = loader.steps_per_epoch
  if steps_per_epoch < 1:
    raise UserError(
      f"config train.batch_size={tcfg.batch_size} exceeds the "
      f"{data.train.n_captions} training captions"
    )
  total_steps = tcfg.epochs * steps_per_epoch
  model = build_model(config.model, data.vocab_size)
  tx = make_optimizer(tcfg, steps_per_epoch)
  state = init_state(
    model,
    tx,
    seed=tcfg.seed,
    num_regions=data.train.num_regions,
    img_dim=data.train.feature_dim,
    caption_len=data.caption_len,
    mesh=mesh,
  )
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  report.log(
    f"model {config.model.head.upper()}: {n_params / 1e6:.2f}M parameters; "
    f"{data.train.n_captions} training captions, {steps_per_epoch} steps/epoch"
  )
  selection = np.ones((data.train.n_captions,), bool)
  ckpt = checkpoint.Checkpointer(workdir)
  record = {"epoch": 0, "best_rsum": -1.0, "best_epoch": -1}
  restored = ckpt.restore_latest(state, selection)
  if restored is not None:
    state = jax.device_put(restored.state, sharding.replicated(mesh))
    selection = np.asarray(restored.selection)
    loader.set_state(restored.data_state)
    record = dict(restored.record)
    report.log(f"resumed at step {int(state.step)} (epoch {record['epoch']})")

  loss_kw = loss_options(config.loss)
  use_gmm = config.loss.selection == "epoch_gmm" and config.loss.name == "srem"
  steps = {}

  def step_fn(warmup):
    key = (warmup, use_gmm and not warmup)
    if key not in steps:
      steps[key] = make_train_step(
        model, tx, loss_kw, mesh, warmup=warmup, external_clean=key[1]
      )
    return steps[key]

  stop = _StopFlag()
  stop.install()
  progress = Progress(total_steps, int(state.step))
  iterator = iter(loader)
  step = int(state.step)
  while step < total_steps:
    epoch = step // steps_per_epoch
    warmup = config.loss.name == "srem" and epoch < tcfg.warmup_epochs
    fn = step_fn(warmup)
    sums = None
    while step < (epoch + 1) * steps_per_epoch:
      batch = next(iterator)
      if use_gmm and not warmup:
        batch["selected"] = selection[batch["cap_index"]]
      state, metrics = fn(state, sharding.global_batch(batch, mesh))
      step += 1
      metrics["steps"] = 1.0
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
      if step % tcfg.log_every_steps == 0 or step % steps_per_epoch == 0:
        summary = epoch_summary(sums)
        _check_finite(summary, step, ckpt.latest_dir)
        report.log(
          f"epoch {epoch + 1}/{tcfg.epochs}{' (warm-up)' if warmup else ''} "
          f"{progress.line(step)} | loss {summary['loss']:.4f} "
          f"clean {summary['selected_frac']:.2f} "
          f"prec {summary['selection_precision']:.3f} "
          f"rec {summary['selection_recall']:.3f}"
        )
      if stop.signal_name or (
        tcfg.checkpoint_every_steps and step % tcfg.checkpoint_every_steps == 0
      ):
        ckpt.save_latest(step, state, loader.get_state(), selection, record)
        if stop.signal_name:
          ckpt.close()
          loader.close()
          report.log(
            f"{stop.signal_name}: saved step {step} in {ckpt.latest_dir}; "
            "rerun the same command to resume"
          )
          raise SystemExit(0)
    summary = epoch_summary(sums)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    val = evaluate.evaluate_split(
      model, variables, data.val, config, mesh, data.caption_len, data.val_images
    )
    report.write(
      {"step": step, "epoch": epoch + 1, "split": "train", "warmup": warmup, **summary}
    )
    report.write({"step": step, "epoch": epoch + 1, "split": "val", **val})
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
    if use_gmm and epoch + 1 >= tcfg.warmup_epochs and step < total_steps:
      selection = _gmm_selection(config, model, state, data, mesh)
    ckpt.save_latest(step, state, loader.get_state(), selection, record)

  loader.close()
  ckpt.wait()
  best = ckpt.restore_best(state)
  final_state = best.state if best is not None else state
  ckpt.close()
  variables = {"params": final_state.params, "batch_stats": final_state.batch_stats}
  test = evaluate.evaluate_split(
    model,
    variables,
    data.test,
    config,
    mesh,
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
  report.write({"step": step, "epoch": record["epoch"], "split": "test", **test})
  path = report.write_json("results.json", results)
  rows = test if "rsum" not in test else {"test": test}
  report.log("\n" + recall_table({k: v for k, v in rows.items()}))
  report.log(
    f"best epoch {record['best_epoch']} (val rSum {record['best_rsum']:.1f}); "
    f"results in {path}; took {format_duration(progress.elapsed())}"
  )
  return results
