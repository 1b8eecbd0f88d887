"""Training a study's runs: each a normal workdir, skipped when finished."""

import json
import math
import multiprocessing
import os
import sys

import jax

from srem_jax import train
from srem_jax.data import dataset
from srem_jax.errors import UserError
from srem_jax.study.report import write_report
from srem_jax.study.settings import Setting, run_config


def check_same_data(out_dir: str, base) -> None:
  """Refuses to mix runs trained on different data in one study folder."""
  path = os.path.join(out_dir, "data.json")
  data = {"name": base.data.name, **base.data.synthetic.to_dict()}
  if not os.path.isfile(path):
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(data, f, indent=2)
    return
  with open(path) as f:
    before = json.load(f)
  changed = sorted(k for k in data if before.get(k) != data[k])
  if changed:
    raise UserError(
      f"{path}: this study's data was generated with other settings "
      f"({', '.join(changed)} differ); rerun with the original sizes or "
      "choose a new --out"
    )


def _train_one(config, workdir: str, log_path: str | None, cache_dir: str | None):
  """One run; in a worker process its output goes to `log_path`."""
  if log_path is not None:
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)  # the C++ side (XLA warnings) writes to fd 1/2 too
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
  if cache_dir is not None:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
  results = train.train_and_evaluate(config, workdir)
  return results["test"].get("rsum", math.nan)


def run_all(
  base, out_dir: str, settings: list[Setting], seeds: list[int], jobs: int = 1
) -> None:
  """Trains every (setting, seed) that has not finished yet, `jobs` at a time.

  With jobs > 1 each run trains in its own fresh process (spawned, not forked:
  JAX does not survive a fork) and logs to `<out>/runs/<name>.log`.
  """
  check_same_data(out_dir, base)
  data_dir = os.path.join(out_dir, "data")
  todo = []
  for setting in settings:
    for seed in seeds:
      workdir = os.path.join(out_dir, "runs", setting.run_name(seed))
      if os.path.isfile(os.path.join(workdir, "results.json")):
        print(f"{setting.label} {setting.method} seed {seed}: finished, skipped")
      else:
        todo.append((run_config(base, setting, seed, data_dir), workdir))
  if not todo:
    return
  if jobs == 1:
    for index, (config, workdir) in enumerate(todo, 1):
      print(f"[{index}/{len(todo)}] {workdir}", flush=True)
      _train_one(config, workdir, None, None)
      jax.clear_caches()  # each run compiles its own steps; keep memory flat
    return
  # Generated and prepared once here, so parallel runs never race to write it.
  dataset.ensure_prepared(todo[0][0].data, log=print)
  os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
  cache_dir = jax.config.jax_compilation_cache_dir
  context = multiprocessing.get_context("spawn")
  with context.Pool(jobs, maxtasksperchild=1) as pool:
    pending = [
      (
        workdir,
        pool.apply_async(_train_one, (config, workdir, workdir + ".log", cache_dir)),
      )
      for config, workdir in todo
    ]
    print(f"{len(todo)} runs, {jobs} at a time; logs in <run>.log", flush=True)
    for index, (workdir, result) in enumerate(pending, 1):
      rsum = result.get()  # re-raises a run's error here, naming its log
      print(f"[{index}/{len(todo)}] {workdir}: test rSum {rsum:.1f}", flush=True)


def run_study(
  base, out_dir: str, settings, seeds, command: str, jobs: int = 1, train: bool = True
) -> str:
  """Trains what is unfinished (unless `train` is False), then writes the report."""
  if train:
    run_all(base, out_dir, settings, seeds, jobs)
  else:
    check_same_data(out_dir, base)
  return write_report(out_dir, base, settings, seeds, command)
