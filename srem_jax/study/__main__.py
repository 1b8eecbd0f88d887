"""`python -m srem_jax.study`: the command line of `srem_jax.study`."""

import os
import pathlib
import shlex
import sys

import jax
from absl import flags
from ml_collections import config_flags

import configs
from srem_jax import cli, study
from srem_jax.errors import UserError
from srem_jax.methods.readings import READINGS
from srem_jax.study import CLEAN_PHASE, METHODS, plan, run_study

# absl's --help prints the main module's docstring: the package's.
__doc__ = study.__doc__

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(configs.__file__).with_name("demo.py")),
  "Base config of every run; override fields with --config.a.b=v.",
  lock_config=True,
)
_OUT = flags.DEFINE_string("out", None, "Study folder (rerun the command to resume).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Number of seeds per setting.")
_FIRST_SEED = flags.DEFINE_integer(
  "first_seed", 0, "First seed: seeds first_seed, first_seed + 1, ... are trained."
)
_RATIOS = flags.DEFINE_list(
  "ratios", "0,0.2,0.4,0.6,0.8", "Caption-level noise ratios."
)
_METHODS = flags.DEFINE_list("methods", ",".join(METHODS), "Methods to train.")
_READINGS = flags.DEFINE_list(
  "readings",
  "",
  "Readings of SREM (srem_jax/methods/readings.py) trained at every noise ratio "
  "beside the methods, each as the method 'srem <reading>'.",
)
_IMAGE_RATIOS = flags.DEFINE_list("image_ratios", "0.4", "Image-level noise ratios.")
_ABLATIONS = flags.DEFINE_bool("ablations", True, "Add the SREM ablations.")
_ABLATION_RATIOS = flags.DEFINE_list(
  "ablation_ratios", "0.6", "Caption noise ratios of the SREM ablations."
)
_CLEAN_PHASE_RATIOS = flags.DEFINE_list(
  "clean_phase_ratios",
  "",
  "Caption noise ratios at which to train SREM with each clean-phase factor "
  f"changed ({'; '.join(CLEAN_PHASE)}).",
)
_REPORT_ONLY = flags.DEFINE_bool(
  "report_only",
  False,
  "Write study.md from the runs finished so far, training nothing (a study run "
  "in parts); unfinished runs are counted in its header.",
)
_EPOCHS = flags.DEFINE_integer(
  "epochs", 10, "Epochs per run; warm-up and LR decay start at 60% of them."
)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 600, "Synthetic training images.")
_JOBS = flags.DEFINE_integer(
  "jobs", 2, "Runs trained at once, each in its own process (2 suits 2 cores)."
)


def _ratios(flag) -> list[float]:
  try:
    values = [float(v) for v in flag.value]
  except ValueError:
    raise UserError(
      f"--{flag.name}: expected comma-separated numbers, got {flag.value}"
    )
  if any(not 0 <= v < 1 for v in values):
    raise UserError(f"--{flag.name}: ratios must lie in [0, 1), got {flag.value}")
  return values


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _OUT.value:
    raise UserError("--out is required, e.g. --out=studies/noise")
  unknown = sorted(set(_METHODS.value) - set(METHODS))
  if unknown or not _METHODS.value:
    raise UserError(f"--methods: expected some of {', '.join(METHODS)}, got {unknown}")
  unknown = sorted(set(_READINGS.value) - set(READINGS))
  if unknown:
    raise UserError(
      f"--readings: expected some of {', '.join(READINGS)}, got {unknown}"
    )
  if min(_SEEDS.value, _EPOCHS.value, _NUM_TRAIN.value, _JOBS.value) < 1:
    raise UserError("--seeds, --epochs, --num_train and --jobs must be at least 1")
  if _FIRST_SEED.value < 0:
    raise UserError(f"--first_seed: expected an integer >= 0, got {_FIRST_SEED.value}")
  base = _CONFIG.value
  base.train.epochs = _EPOCHS.value
  base.train.warmup_epochs = base.train.lr_decay_epochs = round(0.6 * _EPOCHS.value)
  base.data.synthetic.num_train = _NUM_TRAIN.value
  settings = plan(
    _ratios(_RATIOS),
    [m for m in METHODS if m in _METHODS.value],
    _ratios(_IMAGE_RATIOS),
    _ratios(_ABLATION_RATIOS) if _ABLATIONS.value else (),
    _ratios(_CLEAN_PHASE_RATIOS),
    _READINGS.value,
  )
  # Runs of one method differ only in data, so their compiled steps are
  # identical: a persistent cache compiles each once per study, not per run.
  jax.config.update(
    "jax_compilation_cache_dir", os.path.abspath(os.path.join(_OUT.value, "jax_cache"))
  )
  command = "python -m srem_jax.study " + shlex.join(sys.argv[1:])
  seeds = list(range(_FIRST_SEED.value, _FIRST_SEED.value + _SEEDS.value))
  path = run_study(
    base, _OUT.value, settings, seeds, command, _JOBS.value, not _REPORT_ONLY.value
  )
  print(f"study written to {path}", flush=True)


if __name__ == "__main__":
  cli.run(main)
