"""A training run's bookkeeping, the same for every method's loop.

Owns what happens around the steps: opening a run (config checks, mesh,
execution plan, data, model, evaluators, checkpoints, records), the stop
signals, the end of an epoch (records, figures, TensorBoard, the best
checkpoint), the resume check, the final test of the best checkpoint and
closing. A loop (`srem_jax.train.srem`, `srem_jax.train.co_training`) keeps
only its steps and what it saves.

    run = open_run(config, workdir, lambda spe: step.make_optimizer(config.train, spe))
    stop = StopFlag()
    stop.install()
    try:
      ...  # the loop: finish_epoch(run, ...) after each epoch
      exit_if_stopped(run, stop, step)
      return final_test(run, state, record, step, model_variables)
    finally:
      close_run(run, stop)
"""

import dataclasses
import signal
from typing import Any, Callable

import jax
import numpy as np
import optax
from etils import epath

from srem_jax import checkpoint, config_checks, execution, paths, sharding
from srem_jax.data import dataset, pipeline, resident
from srem_jax.errors import UserError
from srem_jax.eval import evaluator
from srem_jax.models.sgraf import SGRAF, build_model
from srem_jax.report import plots, tensorboard
from srem_jax.report.reporting import Reporter, recall_table

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
  """Set by SIGTERM/SIGINT; a loop saves and exits after the current step."""

  def __init__(self):
    self.signal_name = None
    self.previous = {}

  def install(self):
    self.previous = {s: signal.signal(s, self._handle) for s in _STOP_SIGNALS}

  def restore(self):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name


@dataclasses.dataclass
class Run:
  """Everything a loop needs, opened once at start-up."""

  config: Any
  workdir: str
  mesh: Any
  plan: execution.Execution
  report: Reporter
  data: dataset.RunData
  loader: pipeline.TrainLoader
  model: SGRAF
  tx: optax.GradientTransformation
  ckpt: checkpoint.Checkpointer
  steps_per_epoch: int
  features: jax.Array | None  # the training images, when kept on the devices
  events: tensorboard.SummaryWriter | None  # process 0's TensorBoard writer
  val: evaluator.Evaluator
  test: evaluator.Evaluator

  @property
  def total_steps(self) -> int:
    return self.config.train.epochs * self.steps_per_epoch


def open_run(
  config, workdir: str, make_optimizer: Callable[[int], optax.GradientTransformation]
) -> Run:
  """Checks the config and opens everything a run reads and writes;
  `make_optimizer(steps_per_epoch)` gives the loop's optimizer."""
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
  model = build_model(config.model, data.vocab_size, plan)
  evaluate = lambda split, **kw: evaluator.for_config(
    config, model, split, mesh, plan, caption_len=data.caption_len, **kw
  )
  return Run(
    config=config,
    workdir=workdir,
    mesh=mesh,
    plan=plan,
    report=report,
    data=data,
    loader=loader,
    model=model,
    tx=make_optimizer(loader.steps_per_epoch),
    ckpt=checkpoint.Checkpointer(workdir),
    steps_per_epoch=loader.steps_per_epoch,
    features=features,
    events=tensorboard.SummaryWriter.for_workdir(workdir),
    val=evaluate(data.val, num_images=data.val_images),
    test=evaluate(
      data.test, num_images=data.test.n_images, protocol=config.data.eval_protocol
    ),
  )


def new_record(config, **extra) -> dict:
  """The record a checkpoint carries before any epoch; the model fields
  travel with it so `evaluate` can rebuild the network."""
  return {
    "epoch": 0,
    "best_rsum": -1.0,
    "best_epoch": -1,
    **extra,
    "model": config.model.to_dict(),
  }


# The data settings a checkpoint's batches were drawn with.
RESUME_KEYS = ("seed", "global_batch_size", "steps_per_epoch")


def check_resume(saved: dict, current: dict) -> None:
  """Raises when the checkpoint's data iterator (`saved`) was made with other
  settings than this run's (`current`): its batches would not continue."""
  for key in RESUME_KEYS:
    if key in saved and key in current and saved[key] != current[key]:
      raise UserError(
        f"the checkpoint's data iterator has {key}={saved[key]} but this run "
        f"has {current[key]}; resume with the same train.seed and train.batch_size"
      )


def finish_epoch(
  run: Run, *, step: int, epoch: int, train: dict, val: dict, state, record: dict,
  pairs=None, note: str = "",
) -> bool:  # fmt: skip
  """Writes epoch `epoch`'s train and val records (metrics.jsonl, figures,
  TensorBoard; `pairs`, a `PairCollector`, adds the per-pair histograms),
  saves `state` as the best checkpoint when validation improved and logs the
  epoch with `note`. Updates `record`; returns whether it improved."""
  report = run.report
  records = [
    {"step": step, "epoch": epoch, "split": "train", **train},
    {"step": step, "epoch": epoch, "split": "val", **val},
  ]
  for epoch_record in records:
    report.write(epoch_record)
  if report.is_main:
    epoch_pairs = None
    if pairs is not None:
      epoch_pairs = pairs.arrays()
      plots.save_pairs(run.workdir, epoch, **epoch_pairs)
    figures = plots.write_all(run.workdir)
    tensorboard.log_epoch(run.events, records, epoch_pairs, figures)
  record["epoch"] = epoch
  improved = val["rsum"] > record["best_rsum"]
  if improved:
    record.update(best_rsum=val["rsum"], best_epoch=epoch)
    run.ckpt.save_best(step, state, record)
  report.log(
    f"epoch {epoch}: val rSum {val['rsum']:.1f}{' (best)' if improved else ''}{note}"
  )
  return improved


def final_test(run: Run, state, record: dict, step: int, variables_of) -> dict:
  """Tests the best checkpoint (or `state` when none was kept) on the test
  split; `variables_of(state)` gives the variables, or an ensemble's list."""
  best = run.ckpt.restore_best(state)
  final = best.state if best is not None else state
  return report_test(run, run.test.run(variables_of(final)), record, step)


def report_test(run: Run, test: dict, record: dict, step: int) -> dict:
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


def exit_if_stopped(run: Run, stop: StopFlag, step: int) -> None:
  """Waits for the checkpoint writes; after SIGTERM/SIGINT, says where the
  run was saved and raises SystemExit(0)."""
  run.ckpt.wait()
  if stop.signal_name:
    run.report.log(
      f"{stop.signal_name}: saved step {step} in "
      f"{run.ckpt.latest_dir}; rerun the same command to resume"
    )
    raise SystemExit(0)


def close_run(run: Run, stop: StopFlag) -> None:
  stop.restore()
  run.loader.close()
  run.ckpt.close()
  if run.events is not None:
    run.events.close()
