"""NCR's training (docs/ncr.md) in the framework: `config.loss.name = "ncr"`.

Two SGRAF models, "a" and "b", trained in turn on the same data, network,
noise files and evaluation as every other method:

- warm-up epochs (`train.warmup_epochs`): a on every pair, then b, with the
  mean-negative triplet (`ncr.warmup_loss`);
- every later epoch begins with the co-division: each model's per-sample
  loss over the training set (`selection.pair_statistics`), a 2-Gaussian
  mixture per model (`ncr.clean_probability`), labelled = posterior >
  `ncr.p_threshold`; then a trains on b's division and b on a's. A step takes
  one labelled batch (soft-margin hardest-negative triplet, targets refined
  from the GMM posterior and the model's own prediction) and, from co-training
  epoch `ncr.unlabelled_from_epoch` on, one unlabelled batch (targets the two
  models' mean prediction) as a second update;
- validation and test rank the mean of a's and b's similarity matrices.

A model's pass over its labelled set is `|labelled| // batch_size` steps
(capped by `train.steps_per_epoch`); unlabelled batches cycle through
reshuffles of the unlabelled set. Every batch is a function of (seed, epoch,
model, step) and the division, which the checkpoint keeps, so a run stopped
anywhere resumes exactly. The learning rate is `train.lr`, times
`train.lr_decay_factor` from epoch `train.lr_decay_epochs` on (epochs counted
from the first warm-up epoch, as for the other methods). Opening the run,
its records, the best checkpoint, the resume check and the final test are
`srem_jax.train.run`'s, as for the other methods; this module keeps the two
models, their division and their steps.

    results = co_training.train_and_evaluate(config, workdir)
"""

import dataclasses
import functools
import time

import jax
import numpy as np

from srem_jax import execution, sharding
from srem_jax.data import pipeline
from srem_jax.methods import ncr
from srem_jax.report import diagnostics, tensorboard
from srem_jax.report.reporting import Progress
from srem_jax.train import ncr_step, selection, step
from srem_jax.train import run as train_run

MEMBERS = ("a", "b")


# ---- positions, orders and the division ------------------------------------


@dataclasses.dataclass
class Position:
  """Where the run is: epoch, phase (0 = model a, 1 = b), step within it."""

  epoch: int = 0
  phase: int = 0
  step: int = 0
  done: int = 0  # steps of either model so far: the checkpoint's step number


def divide(run, states) -> np.ndarray:
  """(2, N) float32: each model's clean posterior of every training pair."""
  cfg = run.config
  statistic = ncr_step.PerSampleLoss(float(cfg.loss.margin))
  probs = []
  for member in MEMBERS:
    variables = {
      "params": states[member].params,
      "batch_stats": states[member].batch_stats,
    }
    losses = selection.pair_statistics(
      run.model,
      variables,
      run.data,
      cfg,
      run.mesh,
      statistic=statistic,
      features=run.features,
      plan=run.plan,
    )["loss"]
    probs.append(
      ncr.clean_probability(
        losses, iters=cfg.loss.gmm_iters, tol=cfg.loss.gmm_tol, reg=cfg.loss.gmm_reg
      )
    )
  return np.stack(probs).astype(np.float32)


def division_summary(prob: np.ndarray, threshold: float, truth: np.ndarray) -> dict:
  """Labelled fraction, precision and recall of each model's division against
  the injected noise, and their means under the names the plots use."""
  out = {}
  for member, p in zip(MEMBERS, prob):
    labelled = ncr.split_labelled(p, threshold)
    chosen = int(labelled.sum())
    true_chosen = int((labelled & truth).sum())
    out[f"labelled_frac_{member}"] = chosen / labelled.size
    out[f"precision_{member}"] = true_chosen / chosen if chosen else 0.0
    out[f"recall_{member}"] = true_chosen / truth.sum() if truth.sum() else 0.0
  for key, name in (
    ("labelled_frac", "selected_frac"),
    ("precision", "selection_precision"),
    ("recall", "selection_recall"),
  ):
    out[name] = float(np.mean([out[f"{key}_{m}"] for m in MEMBERS]))
  return out


# ---- the run ----------------------------------------------------------------


def _init_states(run):
  data = run.data
  init = functools.partial(
    step.init_state,
    run.model,
    run.tx,
    num_regions=data.train.num_regions,
    img_dim=data.train.feature_dim,
    caption_len=data.caption_len,
    mesh=run.mesh,
    plan=run.plan,
  )
  seed = run.config.train.seed
  # Two models of one run start from different parameters, as NCR's do.
  return {m: init(seed=seed * len(MEMBERS) + i) for i, m in enumerate(MEMBERS)}


def _data_state(run, position: Position, divided: int) -> dict:
  return {
    **dataclasses.asdict(position),
    "divided_epoch": divided,
    "seed": run.config.train.seed,
    "global_batch_size": run.config.train.batch_size,
  }


def ensemble_variables(states) -> list[dict]:
  """The two models' variables: validation and test rank their mean matrix."""
  return [step.model_variables(states[member]) for member in MEMBERS]


class Runner:
  """The NCR loop over one opened run (`run.open_run`)."""

  def __init__(self, run, stop):
    self.run, self.stop = run, stop
    self.config = run.config
    cfg = run.config
    self.threshold = cfg.ncr.p_threshold
    self.features = () if run.features is None else (run.features,)
    self.truth = np.asarray(run.data.noise.clean, bool)
    n = run.data.train.n_captions
    self.states = _init_states(run)
    self.prob = np.zeros((len(MEMBERS), n), np.float32)
    self.divided = -1  # epoch whose division `prob` holds
    self.position = Position()
    self.record = train_run.new_record(cfg, method=ncr.NAME)
    self.division = {}
    kw = dict(model=run.model, tx=run.tx, mesh=run.mesh, margin=float(cfg.loss.margin))
    self._warmup = jit_step(
      functools.partial(ncr_step.warmup_step, **kw), run.mesh, run.plan
    )
    self._co_train = {
      unl: jit_step(
        functools.partial(
          ncr_step.co_train_step, **kw, kind=cfg.ncr.soft_margin, unlabelled=unl
        ),
        run.mesh,
        run.plan,
      )
      for unl in (False, True)
    }
    self.times = {"train": 0.0, "compile": 0.0, "passes": 0.0, "val": 0.0}

  # -- checkpoints --

  def restore(self):
    run = self.run
    restored = run.ckpt.restore_latest(self.states, self.prob)
    n_params = sum(x.size for x in jax.tree.leaves(self.states["a"].params))
    run.report.log(
      f"NCR: two {self.config.model.head.upper()} models of {n_params / 1e6:.2f}M "
      f"parameters; {run.data.train.n_captions} training captions"
    )
    if restored is None:
      return
    train_run.check_resume(restored.data_state, _data_state(run, self.position, -1))
    self.states = jax.device_put(restored.state, sharding.replicated(run.mesh))
    self.prob = np.asarray(restored.selection, np.float32)
    d = restored.data_state
    self.position = Position(d["epoch"], d["phase"], d["step"], d["done"])
    self.divided = int(d["divided_epoch"])
    self.record = dict(restored.record)
    if self.divided == self.position.epoch:
      self.division = division_summary(self.prob, self.threshold, self.truth)
    run.report.log(
      f"resumed NCR at epoch {self.position.epoch + 1}, model "
      f"{MEMBERS[self.position.phase]}, step {self.position.step}"
    )

  def save(self):
    run = self.run
    run.ckpt.save_latest(
      self.position.done,
      self.states,
      _data_state(run, self.position, self.divided),
      self.prob,
      self.record,
    )

  # -- one epoch --

  def _phase_batches(self, epoch, member_index, start):
    """(steps, iterator of (host, global) batches from `start`) of one model's
    phase, read and placed ahead by a thread."""
    run, cfg = self.run, self.config
    seed, size = cfg.train.seed, cfg.train.batch_size
    cap = cfg.train.steps_per_epoch
    data = run.data
    read = functools.partial(
      pipeline.ordered_batches,
      data.train,
      data.noise.t2i,
      data.noise.clean,
      global_batch_size=size,
      caption_len=data.caption_len,
      start=start,
      buckets=data.buckets,
      with_images=run.features is None,
    )
    place = lambda b: sharding.global_batch(b, run.mesh)
    if epoch < cfg.train.warmup_epochs:
      # Whole batches of every pair, as the other methods' epochs.
      order = ncr.warmup_order(seed, epoch, member_index, data.train.n_captions)
      steps = run.steps_per_epoch
      return steps, iter(selection.Prefetch(read(order[: steps * size]), place))
    # Model a trains on b's division and b on a's.
    prob = self.prob[1 - member_index]
    labelled = ncr.split_labelled(prob, self.threshold)
    steps, order_l, order_u = ncr.co_train_orders(
      seed, epoch, member_index, labelled, size, cap
    )
    use_u = epoch >= ncr_step.unlabelled_from(cfg) and order_u.size > 0

    def pairs():
      reads = [read(order_l)]
      if use_u:
        reads.append(read(order_u))
      for parts in zip(*reads):
        parts[0]["prob"] = prob[parts[0]["cap_index"]]
        yield parts

    def place_pair(parts):
      return {name: place(part) for name, part in zip("lu", parts)}

    return steps, iter(selection.Prefetch(pairs(), place_pair))

  def run_epoch(self, progress):
    run, cfg, pos = self.run, self.config, self.position
    epoch = pos.epoch
    warm = epoch < cfg.train.warmup_epochs
    if self.stop.signal_name:  # arrived during the last validation
      self.save()
      return None
    if not warm and self.divided != epoch:
      start = time.perf_counter()
      self.prob = divide(run, self.states)
      self.divided = epoch
      self.times["passes"] += time.perf_counter() - start
      self.division = division_summary(self.prob, self.threshold, self.truth)
      run.report.log(
        f"epoch {epoch + 1}: division labelled "
        + ", ".join(
          f"{m} {self.division[f'labelled_frac_{m}']:.3f} "
          f"(prec {self.division[f'precision_{m}']:.3f})"
          for m in MEMBERS
        )
      )
    sums = jax.device_put(
      {k: np.zeros((), np.float32) for k in ncr_step.SUMMED},
      sharding.replicated(run.mesh),
    )
    lr = jax.device_put(
      np.float32(ncr_step.learning_rate(cfg.train, epoch)),
      sharding.replicated(run.mesh),
    )
    use_u = epoch >= ncr_step.unlabelled_from(cfg)
    start, compile_start = time.perf_counter(), self._compile_seconds()
    while pos.phase < len(MEMBERS):
      member = MEMBERS[pos.phase]
      steps, batches = self._phase_batches(epoch, pos.phase, pos.step)
      other = MEMBERS[1 - pos.phase]
      if not warm and pos.step == 0:
        run.report.log(
          f"epoch {epoch + 1}: model {member} trains {steps} steps on model "
          f"{other}'s division"
        )
      other = self.states[other]
      for _, batch in batches:
        with jax.transfer_guard("disallow"):
          carry = (self.states[member], sums)
          if warm:
            self.states[member], sums = self._warmup(carry, batch, lr, *self.features)
          else:
            fn = self._co_train[use_u and "u" in batch]
            self.states[member], sums = fn(carry, other, batch, lr, *self.features)
        pos.step += 1
        pos.done += 1
        if pos.done % cfg.train.log_every_steps == 0:
          self._log(epoch, warm, progress, sums)
        every = cfg.train.checkpoint_every_steps
        if self.stop.signal_name or (every and pos.done % every == 0):
          self._check(sums)
          self.save()
        if self.stop.signal_name:
          batches.close()
          return None
      pos.phase, pos.step = pos.phase + 1, 0
    jax.block_until_ready((self.states, sums))
    compile_s = self._compile_seconds() - compile_start
    self.times["compile"] += compile_s
    self.times["train"] += time.perf_counter() - start - compile_s
    return self._check(sums)

  def _compile_seconds(self) -> float:
    return step.compile_seconds((self._warmup, *self._co_train.values()))

  def _check(self, sums) -> dict:
    s = {k: float(v) for k, v in jax.device_get(sums).items()}
    steps = max(s.pop("steps"), 1.0)
    summary = {k: v / steps for k, v in s.items()}
    diagnostics.check_finite(
      {
        "loss": summary["loss"],
        "loss_clean": summary["loss_labelled"],
        "loss_cmbcl": 0.0,
      },
      self.position.done,
      self.run.ckpt.latest_dir,
    )
    return summary

  def _log(self, epoch, warm, progress, sums):
    summary = self._check(sums)
    self.run.report.log(
      f"epoch {epoch + 1}/{self.config.train.epochs}{' (warm-up)' if warm else ''} "
      f"model {MEMBERS[self.position.phase]} {progress.line(self.position.done)} | "
      f"loss {summary['loss']:.4f}"
    )

  # -- the end of an epoch --

  def end_of_epoch(self, summary):
    run, cfg, pos = self.run, self.config, self.position
    epoch = pos.epoch
    warm = epoch < cfg.train.warmup_epochs
    start = time.perf_counter()
    val = run.val.run(ensemble_variables(self.states))
    self.times["val"] += time.perf_counter() - start
    times = self.times
    train_run.finish_epoch(
      run,
      step=pos.done,
      epoch=epoch + 1,
      train={
        "warmup": warm,
        **summary,
        **({} if warm else self.division),
        "time_train_s": times["train"],
        "time_compile_s": times["compile"],
        "time_passes_s": times["passes"],
      },
      val={**val, "time_val_s": times["val"]},
      state=self.states,
      record=self.record,
    )
    self.times = dict.fromkeys(self.times, 0.0)
    self.position = Position(epoch + 1, 0, 0, pos.done)
    self.save()


def train_and_evaluate(config, workdir: str) -> dict:
  """NCR's counterpart of `train.train_and_evaluate`: same workdir, resume,
  SIGTERM and results."""
  run = train_run.open_run(
    config, workdir, lambda spe: ncr_step.make_optimizer(config.train)
  )
  stop = train_run.StopFlag()
  stop.install()
  try:
    runner = Runner(run, stop)
    runner.restore()
    tensorboard.log_config(run.events, config, runner.position.done)
    # An estimate: co-training passes are as long as the labelled sets.
    estimate = config.train.epochs * len(MEMBERS) * run.steps_per_epoch
    progress = Progress(estimate, runner.position.done)
    while runner.position.epoch < config.train.epochs:
      summary = runner.run_epoch(progress)
      if summary is None:
        break
      runner.end_of_epoch(summary)
    done = runner.position.done
    train_run.exit_if_stopped(run, stop, done)
    return train_run.final_test(
      run, runner.states, runner.record, done, ensemble_variables
    )
  finally:
    train_run.close_run(run, stop)


def jit_step(fn, mesh, plan=None):
  """jit with the (state, sums) carry donated and every output replicated,
  compiled ahead of time with the execution `plan`'s compiler options and
  its compile time kept (`step.TimedJit`)."""
  return step.TimedJit(
    jax.jit(
      fn,
      out_shardings=sharding.replicated(mesh),
      donate_argnums=(0,),
      compiler_options=execution.compiler_options(plan),
    )
  )
