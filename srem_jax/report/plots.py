"""Pictures and a short summary of a run, read back from its `metrics.jsonl`.

`write_all` draws one PNG per question a user asks of a noisy-label run
into `<workdir>/plots/`: are the loss terms going down (`loss.png`), is
validation improving (`val_rsum.png`), does the clean-sample selection find
the truly clean pairs (`selection.png`), and do energy and swapped entropy
separate truly clean from truly noisy pairs (`energy_entropy.png` for the
epoch means, `energy_entropy_hist.png` for every pair of the last epoch, from
the `pairs_last_epoch.npz` that training writes with `save_pairs`). Epochs of
warm-up are shaded. Missing keys only leave out their curves.

    plots.save_pairs("workdirs/demo", 3, energy=e, entropy=h, truly_clean=c)
    plots.write_all("workdirs/demo")  # -> ["workdirs/demo/plots/loss.png", ...]
    print(plots.summary_table("workdirs/demo"))
"""

import io
import json
import math

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from srem_jax import paths

LOSS_KEYS = ("loss", "loss_clean", "loss_cmbcl")
SELECTION_KEYS = ("selection_precision", "selection_recall", "selected_frac")
PAIRS_FILE = "pairs_last_epoch.npz"


def as_float(value) -> float:
  """JSON numbers, and the "nan"/"inf" strings the reporter writes for them."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def read_metrics(path) -> list[dict]:
  """The records of a metrics file; a run killed mid-write may leave a
  partial last line, which is skipped rather than failing a plot."""
  records = []
  with epath.Path(path).open() as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def by_epoch(records: list[dict], split: str) -> list[dict]:
  """One record per epoch of `split`, the last written winning (a resumed
  run may repeat an epoch), in epoch order."""
  latest = {}
  for record in records:
    if record.get("split") == split and "epoch" in record:
      latest[int(as_float(record["epoch"]))] = record
  return [latest[e] for e in sorted(latest)]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(epochs, values) of `key` over rows that have it."""
  pairs = [(int(r["epoch"]), as_float(r[key])) for r in rows if key in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def write_atomically(path, data: bytes) -> str:
  """Writes through a temporary name so a reader never opens half a file."""
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)
  return str(path)


def save_figure(fig: Figure, path) -> str:
  FigureCanvasAgg(fig)
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  return write_atomically(path, png.getvalue())


def save_pairs(workdir, epoch: int, *, energy, entropy, truly_clean) -> str:
  """Every training pair's energy, swapped entropy and injected-noise truth
  at `epoch` into `<workdir>/plots/pairs_last_epoch.npz`, replacing the
  previous epoch's."""
  out_dir = paths.as_path(workdir) / "plots"
  out_dir.mkdir(parents=True, exist_ok=True)
  npz = io.BytesIO()
  np.savez(
    npz,
    energy=np.asarray(energy, np.float32),
    entropy=np.asarray(entropy, np.float32),
    truly_clean=np.asarray(truly_clean, bool),
    epoch=np.asarray(epoch, np.int64),
  )
  return write_atomically(out_dir / PAIRS_FILE, npz.getvalue())


def pair_histograms(path, pairs_path) -> str | None:
  """Energy and swapped-entropy histograms, truly clean vs truly noisy, of
  the pairs a `save_pairs` file holds; a noise-free run has one group."""
  with np.load(io.BytesIO(epath.Path(pairs_path).read_bytes())) as saved:
    pairs = {key: saved[key] for key in saved.files}
  truth = pairs["truly_clean"]
  panels = [
    (
      title,
      title,
      {"truly clean": pairs[key][truth], "truly noisy": pairs[key][~truth]},
    )
    for title, key in (("energy", "energy"), ("swapped entropy", "entropy"))
  ]
  return histogram_panels(
    path,
    f"epoch {int(pairs['epoch'])}: every training pair, truly clean vs truly noisy",
    panels,
  )


def _panel_figure(path, title: str, panels: list, draw) -> str:
  """One row of panels; `draw(ax, content)` fills each, this labels and saves.

  `panels` is a list of (panel title, x label, y label, content).
  """
  fig = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
  fig.suptitle(title)
  for index, (panel_title, xlabel, ylabel, content) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), index + 1)
    draw(ax, content)
    ax.set_title(panel_title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  return save_figure(fig, path)


def line_panels(path, title: str, panels: list, shade_until: int = 0) -> str | None:
  """Side-by-side panels of lines against epoch.

  `panels` is a list of (panel title, y label, {curve label: (xs, ys)}).
  Epochs up to `shade_until` are shaded as warm-up. Returns None, writing
  nothing, when no panel has a point.
  """
  panels = [p for p in panels if any(xs for xs, _ in p[2].values())]
  if not panels:
    return None

  def draw(ax, curves):
    for label, (xs, ys) in curves.items():
      if xs:
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    if shade_until > 0:
      ax.axvspan(0.5, shade_until + 0.5, color="0.9", label="warm-up", zorder=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))

  panels = [(t, "epoch", y, curves) for t, y, curves in panels]
  return _panel_figure(path, title, panels, draw)


def _finite(values) -> np.ndarray:
  values = np.asarray(values, np.float64)
  return values[np.isfinite(values)]


def histogram_panels(path, title: str, panels: list, bins: int = 40) -> str | None:
  """Side-by-side panels of overlaid, density-normalised histograms.

  `panels` is a list of (panel title, x label, {group label: values}); the
  groups of a panel share bin edges so their shapes compare directly.
  Non-finite values are left out (they have no bin). Returns None, writing
  nothing, when every group is empty.
  """
  panels = [(t, x, {k: _finite(v) for k, v in g.items()}) for t, x, g in panels]
  panels = [(t, x, {k: v for k, v in g.items() if v.size}) for t, x, g in panels]
  panels = [p for p in panels if p[2]]
  if not panels:
    return None

  def draw(ax, groups):
    edges = np.histogram_bin_edges(np.concatenate(list(groups.values())), bins)
    for label, values in groups.items():
      ax.hist(values, edges, density=True, alpha=0.5, label=f"{label} ({len(values)})")

  panels = [(t, x, "density", groups) for t, x, groups in panels]
  return _panel_figure(path, title, panels, draw)


def _warmup_epochs(train_rows: list[dict]) -> int:
  return max((int(r["epoch"]) for r in train_rows if r.get("warmup")), default=0)


def write_all(workdir: str) -> list[str]:
  """Draws the run's PNGs into `<workdir>/plots/`; returns their paths."""
  metrics_path = paths.as_path(workdir) / "metrics.jsonl"
  if not metrics_path.exists():
    return []
  records = read_metrics(metrics_path)
  train, val = by_epoch(records, "train"), by_epoch(records, "val")
  warm = _warmup_epochs(train)
  out_dir = paths.as_path(workdir) / "plots"
  out_dir.mkdir(parents=True, exist_ok=True)
  out = lambda name: out_dir / name
  written = [
    line_panels(
      out("loss.png"),
      "loss terms (epoch means)",
      [("training loss", "loss", {k: series(train, k) for k in LOSS_KEYS})],
      warm,
    ),
    line_panels(
      out("val_rsum.png"),
      "validation",
      [("rSum", "rSum", {"val rSum": series(val, "rsum")})],
      warm,
    ),
    line_panels(
      out("selection.png"),
      "clean-sample selection against the true noise",
      [("selection", "fraction", {k: series(train, k) for k in SELECTION_KEYS})],
      warm,
    ),
    line_panels(
      out("energy_entropy.png"),
      "truly clean vs truly noisy pairs (epoch means)",
      [
        (
          "energy",
          "energy",
          {g: series(train, f"energy_{g}") for g in ("clean", "noisy")},
        ),
        (
          "swapped entropy",
          "entropy",
          {g: series(train, f"entropy_{g}") for g in ("clean", "noisy")},
        ),
      ],
      warm,
    ),
  ]
  if (out_dir / PAIRS_FILE).exists():
    written.append(
      pair_histograms(out("energy_entropy_hist.png"), out_dir / PAIRS_FILE)
    )
  return [p for p in written if p]


def _fmt(value, spec: str) -> str:
  number = as_float(value)
  return "-" if value is None or math.isnan(number) else format(number, spec)


def summary_table(workdir: str) -> str:
  """Selection quality and validation rSum at the last and the best epoch."""
  metrics_path = paths.as_path(workdir) / "metrics.jsonl"
  if not metrics_path.exists():
    return ""
  records = read_metrics(metrics_path)
  train = {int(r["epoch"]): r for r in by_epoch(records, "train")}
  val = {int(r["epoch"]): r for r in by_epoch(records, "val")}
  if not train:
    return ""
  last = max(train)
  best = max(val, key=lambda e: as_float(val[e].get("rsum")), default=last)
  lines = [
    f"{'':<12} {'epoch':>5} {'selected':>9} {'precision':>9} {'recall':>7} {'val rSum':>9}"
  ]
  for name, epoch in (("last epoch", last), ("best epoch", best)):
    t, v = train.get(epoch, {}), val.get(epoch, {})
    lines.append(
      f"{name:<12} {epoch:>5} {_fmt(t.get('selected_frac'), '.3f'):>9} "
      f"{_fmt(t.get('selection_precision'), '.3f'):>9} "
      f"{_fmt(t.get('selection_recall'), '.3f'):>7} {_fmt(v.get('rsum'), '.1f'):>9}"
    )
  return "\n".join(lines)
