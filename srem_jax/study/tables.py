"""A study's finished runs summarised: mean ± std over seeds, and paired by seed."""

import dataclasses
import json
import math
import os

import numpy as np

from srem_jax.report import plots
from srem_jax.study.settings import Setting


@dataclasses.dataclass
class RunSummary:
  test: dict
  last_train: dict
  train_epochs: list
  warmup_epochs: int
  val_epochs: list = dataclasses.field(default_factory=list)


def load_run(workdir: str) -> RunSummary:
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  records = plots.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  train_rows = plots.by_epoch(records, "train")
  return RunSummary(
    test=results["test"],
    last_train=train_rows[-1] if train_rows else {},
    train_epochs=train_rows,
    warmup_epochs=max(
      (int(r["epoch"]) for r in train_rows if r.get("warmup")), default=0
    ),
    val_epochs=plots.by_epoch(records, "val"),
  )


def mean_std(values) -> tuple[float, float]:
  values = np.array([plots.as_float(v) for v in values], np.float64)
  values = values[~np.isnan(values)]
  if values.size == 0:
    return math.nan, math.nan
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def cell(values, spec: str, with_spread: bool) -> str:
  mean, std = mean_std(values)
  if math.isnan(mean):
    return "-"
  return f"{mean:{spec}} ± {std:{spec}}" if with_spread else f"{mean:{spec}}"


def group_runs(runs: dict, setting: Setting, seeds) -> list[RunSummary]:
  """The finished runs of `setting`, in seed order."""
  return [runs[setting, seed] for seed in seeds if (setting, seed) in runs]


def val_at(run: RunSummary, epoch: int):
  return next((r.get("rsum") for r in run.val_epochs if int(r["epoch"]) == epoch), None)


# A run counts as past its initial plateau when validation rSum is at least
# this: about three times chance (32 for 100 images x 500 captions).
PLATEAU_BAR = 100.0


def table(settings, seeds, runs: dict, warmup_epochs: int = 0) -> str:
  """One row per setting; with `warmup_epochs` > 0 a column of validation rSum
  after that many epochs (where SREM's and NCR's warm-ups end) and how many
  seeds were at or above `PLATEAU_BAR` then."""
  spread = len(seeds) > 1
  warm_head, warm_rule = (
    (f" val rSum @{warmup_epochs} (seeds ≥ {PLATEAU_BAR:g}) |", "---:|")
    if warmup_epochs > 0
    else ("", "")
  )
  lines = [
    f"| setting | method |{warm_head} test rSum | i2t R@1 | t2i R@1 "
    "| sel. precision | sel. recall |",
    f"|---|---|{warm_rule}---:|---:|---:|---:|---:|",
  ]
  for s in settings:
    group = group_runs(runs, s, seeds)
    if not group:
      lines.append(
        f"| {s.label} | {s.method} | not trained yet |{' |' * (5 if warm_head else 4)}"
      )
      continue
    test = lambda k: [r.test.get(k) for r in group]
    last = lambda k: [r.last_train.get(k) for r in group]
    warm = ""
    if warmup_epochs > 0:
      values = [val_at(r, warmup_epochs) for r in group]
      past = sum(v is not None and plots.as_float(v) >= PLATEAU_BAR for v in values)
      warm = f" {cell(values, '.1f', spread)} ({past}/{len(group)}) |"
    lines.append(
      f"| {s.label} | {s.method} |{warm} {cell(test('rsum'), '.1f', spread)} "
      f"| {cell(test('i2t_r1'), '.1f', spread)} | {cell(test('t2i_r1'), '.1f', spread)} "
      f"| {cell(last('selection_precision'), '.3f', spread)} "
      f"| {cell(last('selection_recall'), '.3f', spread)} |"
    )
  return "\n".join(lines)


def paired_table(settings, seeds, runs: dict, reference: str = "srem") -> str | None:
  """Test rSum minus the `reference` method's at the same noise and seed (same
  data, noise and initialisation), mean ± std over seeds with the per-seed
  differences. Against "srem" every other method gets a row; against a
  baseline, SREM and its readings (methods starting with "srem") do, so
  their rows read "how far SREM is ahead"."""
  by_cell = {(s.protocol, s.ratio): s for s in settings if s.method == reference}
  rows = []
  for s in settings:
    ref = by_cell.get((s.protocol, s.ratio))
    if ref is None or s is ref:
      continue
    if reference != "srem" and not s.method.startswith("srem"):
      continue
    diffs = {
      seed: plots.as_float(runs[s, seed].test.get("rsum"))
      - plots.as_float(runs[ref, seed].test.get("rsum"))
      for seed in seeds
      if (s, seed) in runs and (ref, seed) in runs
    }
    if not diffs:
      continue
    mean, std = mean_std(diffs.values())
    ahead = sum(d > 0 for d in diffs.values())
    each = " / ".join(f"{diffs[seed]:+.1f}" if seed in diffs else "—" for seed in seeds)
    rows.append(
      f"| {s.label} | {s.method} | {mean:+.1f} ± {std:.1f} | {ahead}/{len(diffs)} "
      f"| {each} |"
    )
  if not rows:
    return None
  seeds_text = " / ".join(map(str, seeds))
  return "\n".join(
    [
      f"| setting | method | test rSum − {reference}'s | seeds ahead "
      f"| per seed ({seeds_text}) |",
      "|---|---|---:|---:|---:|",
      *rows,
    ]
  )
