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

import copy
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import shlex
import sys

import flax
import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

import srem_jax
from srem_jax import checkpoint, cli, execution, plots, selection, sharding, train
from srem_jax.data import dataset
from srem_jax.errors import UserError
from srem_jax.models.sgraf import build_model

METHODS = ("srem", "triplet_hardest", "ccl", "ncr")
ABLATIONS = {
  "srem w/o filtration": {"loss.use_filtration": False},
  "srem w/o entropy weight": {"loss.use_entropy_weight": False},
  "srem beta=0": {"loss.beta": 0.0},
  "srem w/o CMBCL": {"loss.use_cmbcl": False},
}
# One factor of SREM's clean-sample phase changed at a time: which of them lets
# SREM keep improving after warm-up as ccl does.
CLEAN_PHASE = {
  "srem beta=0": ABLATIONS["srem beta=0"],
  "srem mean-reduced triplet": {"loss.clean_reduction": "mean"},
  "srem mean negatives": {"loss.clean_negatives": "mean"},
  "srem margin=0.05": {"loss.margin": 0.05},
  "srem no LR drop": {"train.lr_decay_factor": 1.0},
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One cell of the study: a noise condition and a method (one run per seed)."""

  protocol: str
  ratio: float
  method: str
  overrides: tuple = ()

  @property
  def label(self) -> str:
    return f"{self.protocol} {round(self.ratio * 100)}%"

  def run_name(self, seed: int) -> str:
    method = self.method.replace(" w/o ", "_no_").replace(" ", "_").replace("=", "")
    return f"{self.protocol}{self.ratio:g}_{method}_s{seed}".lower()


def plan(
  ratios, methods, image_ratios=(0.4,), ablation_ratios=(0.6,), clean_phase_ratios=()
) -> list[Setting]:
  """Every setting, in run order; SREM's ablations at each of `ablation_ratios`
  and its clean-phase factors (`CLEAN_PHASE`) at each of `clean_phase_ratios`."""
  settings = [
    Setting("caption", r, m, (("loss.name", m),)) for r in ratios for m in methods
  ]
  settings += [
    Setting("image", r, m, (("loss.name", m),)) for r in image_ratios for m in methods
  ]
  if "srem" in methods:
    settings += [
      Setting("caption", r, name, tuple(fields.items()))
      for r in ablation_ratios
      for name, fields in ABLATIONS.items()
    ]
    settings += [
      Setting("caption", r, name, tuple(fields.items()))
      for r in clean_phase_ratios
      for name, fields in CLEAN_PHASE.items()
    ]
  # An ablation that is also a clean-phase factor at the same ratio runs once.
  return list(dict.fromkeys(settings))


def run_config(base, setting: Setting, seed: int, data_dir: str):
  config = copy.deepcopy(base)
  config.name = setting.run_name(seed)
  config.data.raw_dir = data_dir
  config.noise.protocol, config.noise.ratio = setting.protocol, setting.ratio
  config.noise.seed = config.train.seed = seed
  for key, value in setting.overrides:
    group, field = key.split(".")
    config[group][field] = value
  return config


def _check_same_data(out_dir: str, base) -> None:
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


# ---- running ----------------------------------------------------------------


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
  _check_same_data(out_dir, base)
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


# ---- summarising --------------------------------------------------------------


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


def _mean_std(values) -> tuple[float, float]:
  values = np.array([plots.as_float(v) for v in values], np.float64)
  values = values[~np.isnan(values)]
  if values.size == 0:
    return math.nan, math.nan
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def _cell(values, spec: str, with_spread: bool) -> str:
  mean, std = _mean_std(values)
  if math.isnan(mean):
    return "-"
  return f"{mean:{spec}} ± {std:{spec}}" if with_spread else f"{mean:{spec}}"


def _group(runs: dict, setting: Setting, seeds) -> list[RunSummary]:
  """The finished runs of `setting`, in seed order."""
  return [runs[setting, seed] for seed in seeds if (setting, seed) in runs]


def _val_at(run: RunSummary, epoch: int):
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
    group = _group(runs, s, seeds)
    if not group:
      lines.append(
        f"| {s.label} | {s.method} | not trained yet |{' |' * (5 if warm_head else 4)}"
      )
      continue
    test = lambda k: [r.test.get(k) for r in group]
    last = lambda k: [r.last_train.get(k) for r in group]
    warm = ""
    if warmup_epochs > 0:
      values = [_val_at(r, warmup_epochs) for r in group]
      past = sum(v is not None and plots.as_float(v) >= PLATEAU_BAR for v in values)
      warm = f" {_cell(values, '.1f', spread)} ({past}/{len(group)}) |"
    lines.append(
      f"| {s.label} | {s.method} |{warm} {_cell(test('rsum'), '.1f', spread)} "
      f"| {_cell(test('i2t_r1'), '.1f', spread)} | {_cell(test('t2i_r1'), '.1f', spread)} "
      f"| {_cell(last('selection_precision'), '.3f', spread)} "
      f"| {_cell(last('selection_recall'), '.3f', spread)} |"
    )
  return "\n".join(lines)


def paired_table(settings, seeds, runs: dict) -> str | None:
  """Test rSum of each setting minus SREM's at the same noise and seed (same
  data, noise and initialisation; SREM and ccl also share their warm-up), mean
  ± std over seeds, with the per-seed differences."""
  reference = {(s.protocol, s.ratio): s for s in settings if s.method == "srem"}
  rows = []
  for s in settings:
    ref = reference.get((s.protocol, s.ratio))
    if ref is None or s is ref:
      continue
    diffs = {
      seed: plots.as_float(runs[s, seed].test.get("rsum"))
      - plots.as_float(runs[ref, seed].test.get("rsum"))
      for seed in seeds
      if (s, seed) in runs and (ref, seed) in runs
    }
    if not diffs:
      continue
    mean, std = _mean_std(diffs.values())
    each = " / ".join(f"{diffs[seed]:+.1f}" if seed in diffs else "—" for seed in seeds)
    rows.append(f"| {s.label} | {s.method} | {mean:+.1f} ± {std:.1f} | {each} |")
  if not rows:
    return None
  seeds_text = " / ".join(map(str, seeds))
  return "\n".join(
    [
      f"| setting | method | test rSum − SREM's | per seed ({seeds_text}) |",
      "|---|---|---:|---:|",
      *rows,
    ]
  )


def _mean_curve(group: list[RunSummary], key: str, split: str = "train"):
  """(epochs, mean over seeds) of a per-epoch train (or val) metric."""
  by_epoch = {}
  for run in group:
    for row in run.val_epochs if split == "val" else run.train_epochs:
      if key in row:
        by_epoch.setdefault(int(row["epoch"]), []).append(row[key])
  epochs = sorted(by_epoch)
  return epochs, [_mean_std(by_epoch[e])[0] for e in epochs]


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
        if s.method == method and s.protocol == protocol and _group(runs, s, seeds)
      ]
      if not cells:
        continue
      stats = [
        _mean_std(r.test.get("rsum") for r in _group(runs, s, seeds)) for s in cells
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
  groups = {s.label: _group(runs, s, seeds) for s in cells}
  groups = {label: g for label, g in groups.items() if g}
  if not groups:
    return None
  panels = [
    (title, "fraction", {label: _mean_curve(g, key) for label, g in groups.items()})
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
    s.method: _group(runs, s, seeds)
    for s in settings
    if s.protocol == "caption" and s.ratio == ratios[0] and s.method in shown
  }
  curves = {m: _mean_curve(g, "rsum", "val") for m, g in groups.items() if g}
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
  group = _group(runs, cell, seeds)
  if not group:
    return None
  panels = [
    (title, title, {g: _mean_curve(group, f"{key}_{g}") for g in ("clean", "noisy")})
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


def write_report(out_dir, base, settings, seeds, command: str, energy_ratio=0.4) -> str:
  """Writes study.md and its figures from the finished runs; returns its path."""
  runs = {}
  for s in settings:
    for seed in seeds:
      workdir = os.path.join(out_dir, "runs", s.run_name(seed))
      if os.path.isfile(os.path.join(workdir, "results.json")):
        runs[s, seed] = load_run(workdir)
  unfinished = len(settings) * len(seeds) - len(runs)
  figures = [
    rsum_figure(os.path.join(out_dir, "rsum_vs_noise.png"), settings, seeds, runs),
    selection_figure(
      os.path.join(out_dir, "selection_srem.png"), settings, seeds, runs
    ),
    energy_figure(
      os.path.join(out_dir, "energy_entropy_srem.png"),
      settings,
      seeds,
      runs,
      energy_ratio,
    ),
    clean_phase_figure(
      os.path.join(out_dir, "clean_phase_srem.png"), settings, seeds, runs
    ),
  ]
  cell = energy_cell(settings, energy_ratio)
  if cell is not None and (cell, seeds[0]) in runs:
    figures.append(
      pair_histogram_figure(
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
  images = [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures if p]
  body = [table(settings, seeds, runs, base.train.warmup_epochs), ""]
  paired = paired_table(settings, seeds, runs)
  if paired is not None:
    body += ["Paired by seed:", "", paired, ""]
  text = "\n".join(header + body + images) + "\n"
  path = os.path.join(out_dir, "study.md")
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return path


def run_study(
  base, out_dir: str, settings, seeds, command: str, jobs: int = 1, train: bool = True
) -> str:
  """Trains what is unfinished (unless `train` is False), then writes the report."""
  if train:
    run_all(base, out_dir, settings, seeds, jobs)
  else:
    _check_same_data(out_dir, base)
  return write_report(out_dir, base, settings, seeds, command)


# ---- command line -------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(cli.REPO_ROOT / "configs" / "demo.py"),
  "Base config of every run; override fields with --config.a.b=v.",
  lock_config=True,
)
_OUT = flags.DEFINE_string("out", None, "Study folder (rerun the command to resume).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Number of seeds (0, 1, ...) per setting.")
_RATIOS = flags.DEFINE_list(
  "ratios", "0,0.2,0.4,0.6,0.8", "Caption-level noise ratios."
)
_METHODS = flags.DEFINE_list("methods", ",".join(METHODS), "Methods to train.")
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
  if min(_SEEDS.value, _EPOCHS.value, _NUM_TRAIN.value, _JOBS.value) < 1:
    raise UserError("--seeds, --epochs, --num_train and --jobs must be at least 1")
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
  )
  # Runs of one method differ only in data, so their compiled steps are
  # identical: a persistent cache compiles each once per study, not per run.
  jax.config.update(
    "jax_compilation_cache_dir", os.path.abspath(os.path.join(_OUT.value, "jax_cache"))
  )
  command = "python -m srem_jax.study " + shlex.join(sys.argv[1:])
  seeds = list(range(_SEEDS.value))
  path = run_study(
    base, _OUT.value, settings, seeds, command, _JOBS.value, not _REPORT_ONLY.value
  )
  print(f"study written to {path}", flush=True)


if __name__ == "__main__":
  cli.run(main)
