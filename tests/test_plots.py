"""Per-run PNGs and the summary table, from hand-written metrics files."""

import json
import struct

import numpy as np

from srem_jax.report import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
  """(width, height) from the IHDR chunk, after checking the signature."""
  data = open(path, "rb").read()
  assert data[:8] == PNG_SIGNATURE
  assert data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def write_metrics(workdir, records, extra_lines=()):
  with open(workdir / "metrics.jsonl", "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
    for line in extra_lines:
      f.write(line)


def train_record(epoch, warmup, precision, recall, **extra):
  return {
    "step": 10 * epoch,
    "epoch": epoch,
    "split": "train",
    "warmup": warmup,
    "loss": 2.0 / epoch,
    "loss_clean": 1.0 / epoch,
    "loss_cmbcl": 1.0 / epoch,
    "selected_frac": 0.5,
    "selection_precision": precision,
    "selection_recall": recall,
    "energy_clean": -3.0 - epoch,
    "energy_noisy": "nan" if epoch == 1 else -2.0,
    "entropy_clean": 0.2,
    "entropy_noisy": 0.6,
    **extra,
  }


def val_record(epoch, rsum):
  return {"step": 10 * epoch, "epoch": epoch, "split": "val", "rsum": rsum}


def first_two_epochs():
  """A warm-up epoch and an SREM epoch with their validation records."""
  return [
    train_record(1, True, 0.6, 1.0),
    val_record(1, 100.0),
    train_record(2, False, 0.8, 0.7),
    val_record(2, 250.0),
  ]


def test_all_plots_written_as_real_pngs(tmp_path):
  write_metrics(
    tmp_path,
    [
      *first_two_epochs(),
      train_record(3, False, 0.9, 0.75),
      val_record(3, 240.0),
      {"step": 30, "epoch": 3, "split": "test", "rsum": 230.0},
    ],
  )
  written = plots.write_all(str(tmp_path))
  names = sorted(p.rsplit("/", 1)[1] for p in written)
  assert names == ["energy_entropy.png", "loss.png", "selection.png", "val_rsum.png"]
  for path in written:
    assert path.startswith(str(tmp_path / "plots"))
    width, height = png_size(path)
    assert height == 360 and width in (500, 1000)  # 5 in per panel at 100 dpi
    assert len(open(path, "rb").read()) > 10_000  # drawn, not an empty canvas
  assert png_size(tmp_path / "plots" / "energy_entropy.png")[0] == 1000
  assert not list((tmp_path / "plots").glob("*.tmp*"))


def test_missing_keys_and_a_partial_line_do_not_crash(tmp_path):
  write_metrics(
    tmp_path,
    [
      {"step": 5, "epoch": 1, "split": "train", "loss": 1.0},
      {"step": 5, "epoch": 1, "split": "val"},
      {"step": 9, "split": "train"},
    ],
    extra_lines=['{"step": 10, "epoch": 2, "spl'],
  )
  written = plots.write_all(str(tmp_path))
  assert [p.rsplit("/", 1)[1] for p in written] == ["loss.png"]
  table = plots.summary_table(str(tmp_path)).splitlines()
  assert table[1].split() == ["last", "epoch", "1", "-", "-", "-", "-"]


def test_no_metrics_file_means_no_plots(tmp_path):
  assert plots.write_all(str(tmp_path)) == []
  assert plots.summary_table(str(tmp_path)) == ""


def test_summary_table_reports_last_and_best_epoch(tmp_path):
  write_metrics(
    tmp_path,
    [
      *first_two_epochs(),
      # A resumed run rewrote epoch 3; the later record counts.
      train_record(3, False, 0.1, 0.1),
      val_record(3, 1.0),
      train_record(3, False, 0.9, 0.75),
      val_record(3, 240.0),
    ],
  )
  lines = plots.summary_table(str(tmp_path)).splitlines()
  assert lines[1].split() == ["last", "epoch", "3", "0.500", "0.900", "0.750", "240.0"]
  assert lines[2].split() == ["best", "epoch", "2", "0.500", "0.800", "0.700", "250.0"]


def test_histograms_share_bins_and_skip_empty_groups(tmp_path):
  rng = np.random.default_rng(0)
  path = plots.histogram_panels(
    tmp_path / "hist.png",
    "clean vs noisy",
    [
      ("energy", "energy", {"clean": rng.normal(-3, 1, 500), "noisy": []}),
      ("entropy", "entropy", {"clean": rng.random(400), "noisy": rng.random(100)}),
    ],
  )
  assert png_size(path) == (1000, 360)  # two panels: the empty group is left out
  assert len(open(path, "rb").read()) > 10_000
  empty = [("energy", "energy", {"clean": [], "noisy": []})]
  assert plots.histogram_panels(tmp_path / "none.png", "t", empty) is None
  assert not (tmp_path / "none.png").exists()


def test_last_epoch_pairs_are_saved_and_drawn_as_histograms(tmp_path):
  write_metrics(tmp_path, [train_record(1, True, 0.6, 1.0), val_record(1, 100.0)])
  without = {p.rsplit("/", 1)[1] for p in plots.write_all(str(tmp_path))}
  rng = np.random.default_rng(1)
  truth = np.arange(300) % 3 > 0
  energy = np.where(truth, -4.0, -2.0) + rng.normal(0, 0.5, 300)
  entropy = np.where(truth, 0.2, 0.8) + rng.normal(0, 0.1, 300)
  saved = plots.save_pairs(
    str(tmp_path), 7, energy=energy, entropy=entropy, truly_clean=truth
  )
  assert saved == str(tmp_path / "plots" / "pairs_last_epoch.npz")
  with np.load(saved) as pairs:
    assert int(pairs["epoch"]) == 7 and pairs["truly_clean"].dtype == bool
    np.testing.assert_array_equal(pairs["truly_clean"], truth)
    np.testing.assert_allclose(pairs["energy"], energy, rtol=1e-6)
    np.testing.assert_allclose(pairs["entropy"], entropy, rtol=1e-6)
  with_pairs = {p.rsplit("/", 1)[1] for p in plots.write_all(str(tmp_path))}
  assert with_pairs - without == {"energy_entropy_hist.png"}
  hist = tmp_path / "plots" / "energy_entropy_hist.png"
  assert png_size(hist) == (1000, 360)  # energy and swapped entropy panels
  assert len(hist.read_bytes()) > 10_000
  assert not list((tmp_path / "plots").glob("*.tmp*"))


def test_histograms_leave_out_non_finite_values(tmp_path):
  values = np.array([0.1, 0.4, np.nan, np.inf, 0.3])
  panels = [("entropy", "entropy", {"clean": values, "noisy": [np.nan]})]
  assert png_size(plots.histogram_panels(tmp_path / "h.png", "t", panels)) == (500, 360)
  only_nan = [("entropy", "entropy", {"noisy": [np.nan, -np.inf]})]
  assert plots.histogram_panels(tmp_path / "none.png", "t", only_nan) is None
