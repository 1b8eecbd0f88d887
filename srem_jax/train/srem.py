"""SREM's training loop (and the single-model baselines ccl, triplet).

Reads top to bottom: the initial or resumed state → the step loop (a step
variant per phase and caption bucket, the epoch's selection handed to each
batch, periodic logs and checkpoints, a clean stop on SIGTERM) → the end of
an epoch (validation, the next selection) → the final test. Opening the run,
its records, checkpoints and the final test are `srem_jax.train.run`'s; the
state and the update step are `srem_jax.train.step`'s.

    results = srem.train_and_evaluate(config, workdir="workdirs/demo")
"""

import time

import jax
import numpy as np

from srem_jax import paths, sharding
from srem_jax.methods import readings
from srem_jax.report import diagnostics, tensorboard
from srem_jax.report.reporting import Progress
from srem_jax.train import run as train_run
from srem_jax.train.run import Run, StopFlag
from srem_jax.train.selection import gmm_selection
from srem_jax.train.step import (
  TimedJit,
  compile_seconds,
  init_state,
  loss_options,
  make_optimizer,
  make_train_step,
  model_variables,
  zero_sums,
)

# ---- the loop ---------------------------------------------------------------


def initial_state(run: Run):
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
    plan=run.plan,
  )
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  run.report.log(
    f"model {run.config.model.head.upper()}: {n_params / 1e6:.2f}M parameters; "
    f"{data.train.n_captions} training captions, {run.steps_per_epoch} steps/epoch"
  )
  selection = np.ones((data.train.n_captions,), bool)
  record = train_run.new_record(run.config)
  restored = run.ckpt.restore_latest(state, selection)
  if restored is not None:
    train_run.check_resume(restored.data_state, run.loader.get_state())
    state = jax.device_put(restored.state, sharding.replicated(run.mesh))
    selection = np.asarray(restored.selection)
    run.loader.set_state(restored.data_state)
    record = dict(restored.record)
    step = int(jax.device_get(state.step))
    run.report.log(f"resumed at step {step} (epoch {record['epoch']})")
  return state, selection, record


class Trace:
  """A profiler trace of steps [start_step, start_step + num_steps) (config.profile)."""

  def __init__(self, profile_cfg, workdir: str, log):
    self.start = profile_cfg.start_step
    self.stop = self.start + profile_cfg.num_steps if profile_cfg.num_steps else -1
    self.dir = str(paths.as_path(workdir) / "profile")
    self.log = log
    self.active = False

  def before(self, step: int) -> None:
    if step == self.start and self.stop > step:
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, done: int, carry) -> None:
    if self.active and done == self.stop:
      self.close(carry)

  def close(self, carry) -> None:
    if self.active:
      jax.block_until_ready(carry)  # the traced steps' device work, complete
      jax.profiler.stop_trace()
      self.active = False
      self.log(f"profile of steps {self.start}..{self.stop - 1} in {self.dir}")


def _data_state(run: Run, next_step: int) -> dict:
  # The loader reads ahead of the step (`PREFETCH`); a batch is a function of
  # its step number, so the state to resume from is that of the next step.
  return {**run.loader.get_state(), "next_step": next_step}


# Global batches in flight to the devices while a step runs.
PREFETCH = 2


def run_steps(run: Run, state, selection, record, stop: StopFlag):
  """The step loop with its periodic actions; returns the final state.

  Each step runs under `jax.transfer_guard("disallow")`: its batch arrives by
  an explicit, prefetched transfer and its metrics stay on the devices until
  a log step reads them with one `jax.device_get`.
  """
  config, report, ckpt, spe = run.config, run.report, run.ckpt, run.steps_per_epoch
  tcfg = config.train
  loss_kw = loss_options(config.loss)
  use_gmm = _uses_epoch_selection(config)
  compiled = {}
  first = int(jax.device_get(state.step))
  progress = Progress(run.total_steps, first)
  trace = Trace(config.profile, run.workdir, report.log)
  features = () if run.features is None else (run.features,)
  carry = (state, None)
  try:
    for step in range(first, run.total_steps):
      epoch = step // spe
      if step == first or step % spe == 0:  # an epoch (or a resumed one) begins
        epoch_start = time.perf_counter()
        compile_start = compile_seconds(compiled.values())
        warmup = config.loss.name == "srem" and epoch < tcfg.warmup_epochs
        external = use_gmm and not warmup
        carry = (carry[0], zero_sums(run.mesh))
        pairs = diagnostics.PairCollector()
        batches = sharding.prefetch_global(
          _host_batches(run.loader, selection if external else None, step, spe),
          run.mesh,
          PREFETCH,
        )
      trace.before(step)
      with (
        jax.profiler.StepTraceAnnotation("train", step_num=step),
        jax.transfer_guard("disallow"),
      ):
        batch = next(batches)
        # One step variant per caption bucket (`padding`), each compiled once.
        key = (warmup, external, batch["tokens"].shape[1])
        if key not in compiled:
          compiled[key] = TimedJit(
            make_train_step(
              run.model,
              run.tx,
              loss_kw,
              run.mesh,
              warmup=warmup,
              external_selection=external,
              features_on_device=run.features is not None,
              summed=True,
              plan=run.plan,
            )
          )
        carry, step_pairs = compiled[key](carry, batch, *features)
        if report.is_main:
          pairs.add(step_pairs)
      done = step + 1
      trace.after(done, carry)
      epoch_end = done % spe == 0
      every = tcfg.checkpoint_every_steps
      save = stop.signal_name or (every and done % every == 0 and not epoch_end)
      if done % tcfg.log_every_steps == 0 or epoch_end or save:
        # The sums carry any NaN since the epoch began: never save past one.
        summary = diagnostics.epoch_summary(jax.device_get(carry[1]))
        diagnostics.check_finite(summary, done, ckpt.latest_dir)
      if done % tcfg.log_every_steps == 0 or epoch_end:
        if report.is_main:
          pairs.flush()
        report.log(
          f"epoch {epoch + 1}/{tcfg.epochs}{' (warm-up)' if warmup else ''} "
          f"{progress.line(done)} | loss {summary['loss']:.4f} "
          f"selected {summary['selected_frac']:.2f} "
          f"prec {summary['selection_precision']:.3f} "
          f"rec {summary['selection_recall']:.3f}"
        )
      if save:
        ckpt.save_latest(done, carry[0], _data_state(run, done), selection, record)
      if stop.signal_name:
        return carry[0]
      if epoch_end:
        # The summary's device_get above waited for the epoch's last step.
        compile_s = compile_seconds(compiled.values()) - compile_start
        summary["time_compile_s"] = compile_s
        summary["time_train_s"] = time.perf_counter() - epoch_start - compile_s
        selection = _end_of_epoch(
          run, done, carry[0], selection, record, summary, pairs
        )
        ckpt.save_latest(done, carry[0], _data_state(run, done), selection, record)
  finally:
    trace.close(carry)
  return carry[0]


def _uses_epoch_selection(config) -> bool:
  """SREM selecting its clean pairs once per epoch (`epoch_gmm`)."""
  selection = readings.resolve(config.loss)["selection"]
  return config.loss.name == "srem" and selection == "epoch_gmm"


def _host_batches(loader, selection, step: int, spe: int):
  """The loader's batches from `step` to the end of its epoch, each with the
  epoch's selection when there is one (`selection`)."""
  for _ in range(step, (step // spe + 1) * spe):
    batch = next(loader)
    if selection is not None:
      batch["selected"] = selection[batch["cap_index"]]
    yield batch


def _end_of_epoch(run: Run, step, state, selection, record, summary, pairs):
  """Validation, the epoch's records and best checkpoint, and the next
  epoch's selection (docs/method.md, Parts)."""
  config, tcfg = run.config, run.config.train
  epoch = step // run.steps_per_epoch - 1
  warmup = config.loss.name == "srem" and epoch < tcfg.warmup_epochs
  start = time.perf_counter()
  val = run.val.run(model_variables(state))
  val["time_val_s"] = time.perf_counter() - start
  # The next epoch's selection is made here and timed with this epoch.
  start = time.perf_counter()
  use_gmm = _uses_epoch_selection(config)
  if use_gmm and epoch + 1 >= tcfg.warmup_epochs and step < run.total_steps:
    selection = gmm_selection(
      config, run.model, state, run.data, run.mesh, run.features, plan=run.plan
    )
  summary["time_passes_s"] = time.perf_counter() - start
  train_run.finish_epoch(
    run,
    step=step,
    epoch=epoch + 1,
    train={"warmup": warmup, **summary},
    val=val,
    state=state,
    record=record,
    pairs=pairs,
    note=f", selection precision {summary['selection_precision']:.3f} "
    f"recall {summary['selection_recall']:.3f}",
  )
  return selection


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint).

  On SIGTERM/SIGINT the current step finishes, a checkpoint is saved and
  SystemExit(0) is raised; rerunning the same command resumes.
  """
  run = train_run.open_run(
    config, workdir, lambda spe: make_optimizer(config.train, spe)
  )
  stop = StopFlag()
  stop.install()
  try:
    state, selection, record = initial_state(run)
    tensorboard.log_config(run.events, config, int(jax.device_get(state.step)))
    state = run_steps(run, state, selection, record, stop)
    step = int(jax.device_get(state.step))
    train_run.exit_if_stopped(run, stop, step)
    return train_run.final_test(run, state, record, step, model_variables)
  finally:
    train_run.close_run(run, stop)
