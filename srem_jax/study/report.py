"""study.md: the header, the tables and the figures of a study folder."""

import datetime
import os

import flax
import jax

import srem_jax
from srem_jax.study import figures
from srem_jax.study.tables import PLATEAU_BAR, load_run, paired_table, table


def write_report(out_dir, base, settings, seeds, command: str, energy_ratio=0.4) -> str:
  """Writes study.md and its figures from the finished runs; returns its path."""
  runs = {}
  for s in settings:
    for seed in seeds:
      workdir = os.path.join(out_dir, "runs", s.run_name(seed))
      if os.path.isfile(os.path.join(workdir, "results.json")):
        runs[s, seed] = load_run(workdir)
  unfinished = len(settings) * len(seeds) - len(runs)
  drawn = [
    figures.rsum_figure(
      os.path.join(out_dir, "rsum_vs_noise.png"), settings, seeds, runs
    ),
    figures.selection_figure(
      os.path.join(out_dir, "selection_srem.png"), settings, seeds, runs
    ),
    figures.energy_figure(
      os.path.join(out_dir, "energy_entropy_srem.png"),
      settings,
      seeds,
      runs,
      energy_ratio,
    ),
    figures.clean_phase_figure(
      os.path.join(out_dir, "clean_phase_srem.png"), settings, seeds, runs
    ),
  ]
  cell = figures.energy_cell(settings, energy_ratio)
  if cell is not None and (cell, seeds[0]) in runs:
    drawn.append(
      figures.pair_histogram_figure(
        os.path.join(out_dir, "energy_entropy_hist_srem.png"),
        out_dir,
        base,
        cell,
        seeds[0],
      )
    )
  syn = base.data.synthetic
  header = [
    "# Noise-robustness study",
    "",
    f"- command: `{command}`",
    f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
    f"- versions: jax {jax.__version__}, flax {flax.__version__}, srem_jax {srem_jax.__version__}",
    f"- seeds: {', '.join(map(str, seeds))} (noise and training seed)"
    + ("; cells are mean ± standard deviation" if len(seeds) > 1 else ""),
    f"- data: synthetic, {syn.num_train} training images × 5 captions, "
    f"{syn.num_test} test images; {base.train.epochs} epochs "
    f"({base.train.warmup_epochs} warm-up for SREM), batch {base.train.batch_size}",
    "- selection precision/recall: last training epoch, against the true noise "
    "(baselines train on every pair: precision = the clean fraction, recall = 1)",
    f"- unfinished: {unfinished} of {len(settings) * len(seeds)} runs (rows "
    "average the finished seeds; rerun the command to train the rest)"
    if unfinished
    else None,
    f"- val rSum @{base.train.warmup_epochs}: validation rSum after "
    f"{base.train.warmup_epochs} epochs, where SREM's and NCR's warm-ups end; "
    f"in brackets the seeds at or above {PLATEAU_BAR:g} (about 3x chance), "
    "i.e. past the initial plateau"
    if base.train.warmup_epochs > 0
    else None,
    "",
  ]
  header = [line for line in header if line is not None]
  images = [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in drawn if p]
  body = [table(settings, seeds, runs, base.train.warmup_epochs), ""]
  for reference in ("srem", "ccl", "ncr"):
    paired = paired_table(settings, seeds, runs, reference)
    if paired is not None:
      body += [f"Paired by seed, against {reference}:", "", paired, ""]
  text = "\n".join(header + body + images) + "\n"
  path = os.path.join(out_dir, "study.md")
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return path
