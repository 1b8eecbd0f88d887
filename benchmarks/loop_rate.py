"""Steps per second of the training loop against the bare jitted step.

Runs `srem.run_steps` for one epoch of the demo config, after one untimed run
that fills a compilation cache, then the same jitted step back to back on one
device-resident batch. The loop's rate is taken from the end of step `--skip`
(past compilation) to the end of the epoch's last step: it includes the input
pipeline, the transfers and the periodic logging, not the epoch-end
validation. Works on the code before and after the loop's rewrite.

    python benchmarks/loop_rate.py [--steps=60] [--skip=10]
"""

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="loop_rate_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

from configs import demo  # noqa: E402
from srem_jax import sharding  # noqa: E402
from srem_jax.train import run as train_run  # noqa: E402
from srem_jax.train import srem  # noqa: E402
from srem_jax.train import step as step_lib  # noqa: E402


def loop_rate(config, workdir, skip):
  """Steps/s of `srem.run_steps` from the end of step `skip` to the epoch's end.

  Steps are dispatched asynchronously: those two steps are waited for, the
  others run as the loop runs them.
  """
  real_make, calls, marks = srem.make_train_step, [0], []
  last = config.train.steps_per_epoch

  def timing(*args, **kwargs):
    step = real_make(*args, **kwargs)

    def stepped(*step_args):
      out = step(*step_args)
      calls[0] += 1
      if calls[0] in (skip, last):
        jax.block_until_ready(out)
        marks.append(time.perf_counter())
      return out

    return stepped

  srem.make_train_step = timing
  try:
    run = train_run.open_run(
      config, workdir, lambda spe: step_lib.make_optimizer(config.train, spe)
    )
    state, selection, record = srem.initial_state(run)
    srem.run_steps(run, state, selection, record, train_run.StopFlag())
    run.loader.close()
    run.ckpt.close()
  finally:
    srem.make_train_step = real_make
  return (last - skip) / (marks[1] - marks[0])


def bare_rate(config, workdir, steps):
  run = train_run.open_run(
    config, workdir, lambda spe: step_lib.make_optimizer(config.train, spe)
  )
  state, _, _ = srem.initial_state(run)
  batch = sharding.global_batch(next(run.loader), run.mesh)
  step = step_lib.make_train_step(
    run.model,
    run.tx,
    step_lib.loss_options(config.loss),
    run.mesh,
    warmup=True,
    external_selection=False,
  )
  state, metrics = step(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  run.loader.close()
  run.ckpt.close()
  return steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--skip", type=int, default=10)
  args = parser.parse_args()
  config = demo.get_config()
  config.train.epochs = 1
  config.train.warmup_epochs = 1
  config.train.steps_per_epoch = args.steps
  root = tempfile.mkdtemp(prefix="loop_rate_run_")
  loop_rate(config, os.path.join(root, "fill_cache"), args.skip)
  loop = loop_rate(config, os.path.join(root, "timed"), args.skip)
  bare = bare_rate(config, os.path.join(root, "bare"), args.steps)
  print(
    f"loop {loop:.2f} steps/s, bare step {bare:.2f} steps/s, ratio {loop / bare:.3f}"
  )


if __name__ == "__main__":
  main()
