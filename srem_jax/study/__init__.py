"""Noise-robustness study: SREM against its baselines and ablations.

On one synthetic dataset (generated once into `<out>/data`), trains SREM,
`triplet_hardest`, `ccl` and NCR at each caption-level noise ratio and at
image-level noise, plus SREM ablations, for each seed. Every run is a normal
workdir `<out>/runs/<name>`: a finished run (it has results.json) is skipped
and a half-finished one resumes, so an interrupted study is finished by
rerunning the same command. The summary is `<out>/study.md` (a table of
mean ± standard deviation over seeds) with PNG figures beside it.

The default (600 synthetic training images x 5 captions, 10 epochs, 1 seed,
2 runs at a time) is a quick look; docs/study/v2/ has the 3-seed, 14-epoch
study and its command. With fewer images or epochs the model does not get
past its initial plateau. `--clean_phase_ratios` adds SREM with one factor of
its clean-sample phase changed (`CLEAN_PHASE`); `--report_only` writes the
table from the runs finished so far. Scale up with --num_train/--epochs (or
any --config.a.b=v) when there is time:

    python -m srem_jax.study --out=studies/noise [--seeds=3] [--jobs=2] \
        [--ratios=0,0.2,0.4,0.6,0.8] [--methods=srem,ccl] [--epochs=10]
"""

from srem_jax.errors import UserError
from srem_jax.study.figures import clean_phase_figure, rsum_figure, selection_figure
from srem_jax.study.report import write_report
from srem_jax.study.runs import run_all, run_study
from srem_jax.study.settings import (
  ABLATIONS,
  CLEAN_PHASE,
  METHODS,
  Setting,
  plan,
  run_config,
)
from srem_jax.study.tables import PLATEAU_BAR, RunSummary, load_run, paired_table, table

__all__ = [
  "ABLATIONS",
  "CLEAN_PHASE",
  "METHODS",
  "PLATEAU_BAR",
  "RunSummary",
  "Setting",
  "UserError",
  "clean_phase_figure",
  "load_run",
  "paired_table",
  "plan",
  "rsum_figure",
  "run_all",
  "run_config",
  "run_study",
  "selection_figure",
  "table",
  "write_report",
]
