"""The study's figures, drawn from its finished runs."""

import os

import numpy as np

from srem_jax import checkpoint, execution, sharding
from srem_jax.data import dataset
from srem_jax.models.sgraf import build_model
from srem_jax.report import plots
from srem_jax.study.settings import ABLATIONS, CLEAN_PHASE, METHODS, Setting, run_config
from srem_jax.study.tables import RunSummary, group_runs, mean_std
from srem_jax.train import selection


def mean_curve(group: list[RunSummary], key: str, split: str = "train"):
  """(epochs, mean over seeds) of a per-epoch train (or val) metric."""
  by_epoch = {}
  for run in group:
    for row in run.val_epochs if split == "val" else run.train_epochs:
      if key in row:
        by_epoch.setdefault(int(row["epoch"]), []).append(row[key])
  epochs = sorted(by_epoch)
  return epochs, [mean_std(by_epoch[e])[0] for e in epochs]


def rsum_figure(path, settings, seeds, runs) -> str | None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 4), layout="constrained")
  ax = fig.add_subplot()
  drawn = False
  for color, method in enumerate(METHODS):
    for protocol, marker, style in (("caption", "o", "-"), ("image", "s", "none")):
      cells = [
        s
        for s in settings
        if s.method == method and s.protocol == protocol and group_runs(runs, s, seeds)
      ]
      if not cells:
        continue
      stats = [
        mean_std(r.test.get("rsum") for r in group_runs(runs, s, seeds)) for s in cells
      ]
      ax.errorbar(
        [100 * s.ratio for s in cells],
        [m for m, _ in stats],
        yerr=[e for _, e in stats],
        marker=marker,
        linestyle=style,
        capsize=3,
        color=f"C{color}",
        label=f"{method} ({protocol}-level)",
      )
      drawn = True
  if not drawn:
    return None
  ax.set_xlabel("noise ratio (%)")
  ax.set_ylabel("test rSum")
  ax.set_title(f"test rSum vs noise (mean ± std over {len(seeds)} seed(s))")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  return plots.save_figure(fig, path)


def selection_figure(path, settings, seeds, runs) -> str | None:
  cells = [s for s in settings if s.method == "srem" and s.protocol == "caption"]
  if not cells:
    return None
  groups = {s.label: group_runs(runs, s, seeds) for s in cells}
  groups = {label: g for label, g in groups.items() if g}
  if not groups:
    return None
  panels = [
    (title, "fraction", {label: mean_curve(g, key) for label, g in groups.items()})
    for title, key in (
      ("selection precision", "selection_precision"),
      ("selection recall", "selection_recall"),
    )
  ]
  warm = max(r.warmup_epochs for g in groups.values() for r in g)
  return plots.line_panels(path, "SREM clean-sample selection per epoch", panels, warm)


def clean_phase_figure(path, settings, seeds, runs) -> str | None:
  """Validation rSum per epoch at the first ratio with clean-phase factors:
  SREM, ccl, SREM with beta=0 and each factor, mean over seeds."""
  # An ablation that is also a factor (beta=0) does not mark a factor ratio.
  ratios = [s.ratio for s in settings if s.method in set(CLEAN_PHASE) - set(ABLATIONS)]
  if not ratios:
    return None
  shown = ("srem", "ccl", *CLEAN_PHASE)
  groups = {
    s.method: group_runs(runs, s, seeds)
    for s in settings
    if s.protocol == "caption" and s.ratio == ratios[0] and s.method in shown
  }
  curves = {m: mean_curve(g, "rsum", "val") for m, g in groups.items() if g}
  warm = max((r.warmup_epochs for g in groups.values() for r in g), default=0)
  return plots.line_panels(
    path,
    f"SREM's clean phase, caption {round(ratios[0] * 100)}% noise\n"
    f"one factor changed at a time, mean of {len(seeds)} seed(s)",
    [("validation rSum", "rSum", curves)],
    warm,
  )


def energy_cell(settings, ratio: float) -> Setting | None:
  """The noisy caption-level SREM setting whose ratio is closest to `ratio`."""
  cells = [
    s
    for s in settings
    if s.method == "srem" and s.protocol == "caption" and s.ratio > 0
  ]
  return min(cells, key=lambda s: abs(s.ratio - ratio)) if cells else None


def energy_figure(path, settings, seeds, runs, ratio: float) -> str | None:
  cell = energy_cell(settings, ratio)
  if cell is None:
    return None
  group = group_runs(runs, cell, seeds)
  if not group:
    return None
  panels = [
    (title, title, {g: mean_curve(group, f"{key}_{g}") for g in ("clean", "noisy")})
    for title, key in (("energy", "energy"), ("swapped entropy", "entropy"))
  ]
  warm = max(r.warmup_epochs for r in group)
  return plots.line_panels(
    path, f"SREM, {cell.label} noise: truly clean vs truly noisy pairs", panels, warm
  )


def pair_histogram_figure(path, out_dir, base, setting, seed) -> str | None:
  """Histograms of energy and swapped entropy over every training pair of one
  run, truly clean vs truly noisy, scored by its last checkpoint (its latest
  epoch) in evaluation mode, in the seeded batches the epoch-level GMM uses."""
  workdir = os.path.join(out_dir, "runs", setting.run_name(seed))
  config = run_config(base, setting, seed, os.path.join(out_dir, "data"))
  variables, record = checkpoint.load_variables(os.path.join(workdir, "checkpoints"))
  data = dataset.open_data(config, workdir, log=lambda _: None)
  mesh = sharding.make_mesh(config.mesh.data)
  model = build_model(
    config.model, data.vocab_size, execution.resolve(config.execution)
  )
  stats = selection.pair_statistics(
    model,
    variables,
    data,
    config,
    mesh,
    tau=config.loss.tau,
    temp=config.loss.energy_temp,
  )
  truth = np.asarray(data.noise.clean, bool)
  panels = [
    (
      title,
      title,
      {"truly clean": stats[key][truth], "truly noisy": stats[key][~truth]},
    )
    for title, key in (("energy", "energy"), ("swapped entropy", "entropy"))
  ]
  return plots.histogram_panels(
    path,
    f"{setting.method}, {setting.label} noise, epoch {record.get('epoch', '?')}: "
    "every training pair",
    panels,
  )
