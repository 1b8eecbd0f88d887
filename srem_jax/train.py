"""SREM training: the epoch loop, resume, final test.

Reads top to bottom: selection diagnostics → the loop (validate every epoch,
keep the best, resume from the workdir, stop cleanly on SIGTERM) → final
test. The state and the update step live in `srem_jax.step`; their names are
imported here so `train.make_train_step` and friends keep working.

    train.train_and_evaluate(config, workdir="workdirs/demo")
"""

import dataclasses
import signal
import time
from typing import Any

import jax
import numpy as np
import optax
from etils import epath

from srem_jax import (
  checkpoint,
  config_checks,
  diagnostics,
  execution,
  paths,
  plots,
  readings,
  resident,
  retrieval,
  sharding,
  tensorboard,
)
from srem_jax.data import dataset, pipeline
from srem_jax.models.sgraf import SGRAF, build_model
from srem_jax.reporting import Progress, Reporter, recall_table
from srem_jax.selection import gmm_selection
from srem_jax.step import (  # noqa: F401  (part of train's interface)
  PAIRS,
  TimedJit,
  TrainState,
  batch_scores,
  init_state,
  loss_options,
  make_optimizer,
  make_train_step,
  train_step,
  zero_sums,
)

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
  config_checks.validate(config, jax.device_count(), jax.process_count())
  on_device = config.data.features_on_device
  mesh = sharding.make_mesh(config.mesh.data)
  report = Reporter(workdir)
  report.log(f"workdir: {paths.absolute(workdir)}")
  plan = execution.resolve(config.execution)
  report.log(f"execution: {plan.reason}")
  warning = execution.cpu_fallback_warning(config.execution)
  if warning:
    report.log(warning)
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
    buckets=data.buckets,
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
    model=build_model(config.model, data.vocab_size, plan),
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
    step = int(jax.device_get(state.step))
    run.report.log(f"resumed at step {step} (epoch {record['epoch']})")
  return state, selection, record


class _Trace:
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


def _data_state(run: _Run, next_step: int) -> dict:
  # The loader reads ahead of the step (`PREFETCH`); a batch is a function of
  # its step number, so the state to resume from is that of the next step.
  return {**run.loader.get_state(), "next_step": next_step}


# Global batches in flight to the devices while a step runs.
PREFETCH = 2


def _train(run: _Run, state, selection, record, stop: _StopFlag):
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
  trace = _Trace(config.profile, run.workdir, report.log)
  features = () if run.features is None else (run.features,)
  carry = (state, None)
  try:
    for step in range(first, run.total_steps):
      epoch = step // spe
      if step == first or step % spe == 0:  # an epoch (or a resumed one) begins
        epoch_start = time.perf_counter()
        compile_start = _compile_seconds(compiled)
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
        compile_s = _compile_seconds(compiled) - compile_start
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


def _compile_seconds(compiled: dict) -> float:
  return sum(fn.compile_s for fn in compiled.values())


def _host_batches(loader, selection, step: int, spe: int):
  """The loader's batches from `step` to the end of its epoch, each with the
  epoch's selection when there is one (`selection`)."""
  for _ in range(step, (step // spe + 1) * spe):
    batch = next(loader)
    if selection is not None:
      batch["selected"] = selection[batch["cap_index"]]
    yield batch


def _end_of_epoch(run: _Run, step, state, selection, record, summary, pairs):
  """Validation, epoch records, best checkpoint, next selection (docs/method.md, Parts)."""
  config, report, tcfg = run.config, run.report, run.config.train
  epoch = step // run.steps_per_epoch - 1
  warmup = config.loss.name == "srem" and epoch < tcfg.warmup_epochs
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  start = time.perf_counter()
  val = retrieval.evaluate(
    run.model,
    variables,
    run.data.val,
    config,
    run.mesh,
    run.data.caption_len,
    run.data.val_images,
  )
  val["time_val_s"] = time.perf_counter() - start
  # The next epoch's selection is made here and timed with this epoch.
  start = time.perf_counter()
  use_gmm = _uses_epoch_selection(config)
  if use_gmm and epoch + 1 >= tcfg.warmup_epochs and step < run.total_steps:
    selection = gmm_selection(
      config, run.model, state, run.data, run.mesh, run.features
    )
  summary["time_passes_s"] = time.perf_counter() - start
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
    run.ckpt.save_best(step, state, record)
  report.log(
    f"epoch {epoch + 1}: val rSum {val['rsum']:.1f}"
    f"{' (best)' if improved else ''}, selection precision "
    f"{summary['selection_precision']:.3f} recall {summary['selection_recall']:.3f}"
  )
  return selection


def _final_test(run: _Run, state, record) -> dict:
  """Tests the best checkpoint with the dataset's protocol; writes results."""
  config, data = run.config, run.data
  best = run.ckpt.restore_best(state)
  final = best.state if best is not None else state
  variables = {"params": final.params, "batch_stats": final.batch_stats}
  test = retrieval.evaluate(
    run.model,
    variables,
    data.test,
    config,
    run.mesh,
    data.caption_len,
    data.test.n_images,
    protocol=config.data.eval_protocol,
  )
  return report_test(run, test, record, int(jax.device_get(state.step)))


def report_test(run: _Run, test: dict, record: dict, step: int) -> dict:
  """Writes the test metrics of a finished run (records, TensorBoard,
  results.json, the tables) and returns its results."""
  config, data = run.config, run.data
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
  if config.loss.name == "ncr":  # two models and their own loop
    from srem_jax import ncr_train

    return ncr_train.train_and_evaluate(config, workdir)
  run = _open_run(config, workdir)
  stop = _StopFlag()
  stop.install()
  try:
    state, selection, record = _initial_state(run)
    tensorboard.log_config(run.events, config, int(jax.device_get(state.step)))
    state = _train(run, state, selection, record, stop)
    exit_if_stopped(run, stop, int(jax.device_get(state.step)))
    return _final_test(run, state, record)
  finally:
    close_run(run, stop)


def exit_if_stopped(run: _Run, stop: _StopFlag, step: int) -> None:
  """Waits for the checkpoint writes; after SIGTERM/SIGINT, says where the
  run was saved and raises SystemExit(0)."""
  run.ckpt.wait()
  if stop.signal_name:
    run.report.log(
      f"{stop.signal_name}: saved step {step} in "
      f"{run.ckpt.latest_dir}; rerun the same command to resume"
    )
    raise SystemExit(0)


def close_run(run: _Run, stop: _StopFlag) -> None:
  stop.restore()
  run.loader.close()
  run.ckpt.close()
  if run.events is not None:
    run.events.close()
