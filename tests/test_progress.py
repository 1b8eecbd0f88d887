"""Progress lines of long passes: preparing data, all-pairs scoring, selection."""

import io
import re

import jax
import numpy as np
import pytest
import rawdata
from test_main import tiny_config

from srem_jax import execution, sharding
from srem_jax.data import dataset, prepare
from srem_jax.eval import evaluator
from srem_jax.models.sgraf import build_model
from srem_jax.report.reporting import PassProgress
from srem_jax.train import selection


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class Terminal(io.StringIO):
  def isatty(self):
    return True


def _lines(text, label):
  return [line for line in text.splitlines() if line.startswith(f"{label}: ")]


def test_a_log_gets_a_line_per_tenth_with_rate_and_eta():
  clock, out = FakeClock(), io.StringIO()
  progress = PassProgress(
    "test scoring", 40, "tiles", items=(4000, "pairs"), stream=out, clock=clock
  )
  for done in range(1, 41):
    clock.now += 0.5  # two tiles a second, 200 pairs a second
    progress(done, 40)
  text = out.getvalue()
  assert "\r" not in text
  lines = _lines(text, "test scoring")
  assert len(lines) == len(text.splitlines())
  # The first tile (compilation) starts the rate; then one line every 4 tiles.
  assert [int(re.search(r"(\d+)/40", s).group(1)) for s in lines] == [
    1,
    *range(4, 41, 4),
  ]
  assert lines[0] == "test scoring: 1/40 tiles, ETA ?"
  # After 20 tiles: 19 tiles in 9.5 s since the first = 200 pairs/s; 20 left = 10 s.
  assert lines[5] == "test scoring: 20/40 tiles, 200 pairs/s, ETA 0:10"
  assert lines[-1] == "test scoring: 40/40 tiles, done in 0:20"


def test_a_slow_log_also_gets_a_line_every_few_seconds():
  clock, out = FakeClock(), io.StringIO()
  progress = PassProgress("prep", 1000, "images", every_s=30, stream=out, clock=clock)
  for done in range(1, 51):
    clock.now += 1.0
    progress(done)
  # 50 of 1000 is under a tenth: the lines come from the 30 s interval.
  assert [s.split(",")[0] for s in _lines(out.getvalue(), "prep")] == [
    "prep: 1/1000 images",
    "prep: 31/1000 images",
  ]
  assert "1.00 images/s, ETA 16:09" in out.getvalue()


def test_a_terminal_gets_one_line_redrawn_in_place():
  clock, out = FakeClock(), Terminal()
  progress = PassProgress("pass", 10, "batches", stream=out, clock=clock)
  for done in range(1, 11):
    clock.now += 1.0
    progress(done)
  text = out.getvalue()
  assert text.count("\n") == 1 and text.endswith("\n")
  assert text.count("\r") == 10  # redrawn after every batch (1 s > redraw_s)
  assert text.split("\r")[-1].rstrip() == "pass: 10/10 batches, done in 0:10"
  # A shorter line blanks the remains of the longer one before it.
  frames = text.split("\r")[1:]
  assert all(len(b) >= len(a.rstrip()) for a, b in zip(frames, frames[1:]))


def test_short_passes_and_quiet_print_nothing():
  for kwargs in ({"delay_s": 5.0}, {"enabled": False}):
    clock, out = FakeClock(), io.StringIO()
    progress = PassProgress("pass", 10, "batches", stream=out, clock=clock, **kwargs)
    for done in range(1, 11):
      clock.now += 0.4  # 4 s in all, under the delay
      progress(done)
    assert out.getvalue() == ""
  # Past the delay the pass speaks, and ends with its own line.
  clock, out = FakeClock(), io.StringIO()
  progress = PassProgress("pass", 10, "batches", delay_s=5, stream=out, clock=clock)
  for done in range(1, 11):
    clock.now += 1.0
    progress(done)
  dones = [int(s.split()[1].split("/")[0]) for s in _lines(out.getvalue(), "pass")]
  assert dones == [5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("quiet", [False, True])
def test_prepare_reports_records_written(tmp_path, capsys, quiet):
  raw_dir = tmp_path / "raw"
  rawdata.write_raw(raw_dir, "toy", {"train": 4, "test": 3})
  prepare.prepare(
    str(raw_dir),
    "toy",
    "",
    str(tmp_path / "prep"),
    log=lambda message: None,
    progress=not quiet,
    progress_delay_s=0.0,
  )
  text = capsys.readouterr().out
  if quiet:
    assert text == ""
    return
  assert "\r" not in text
  for split, images in (("test", 3), ("train", 4)):
    for record_set, total in (("images", images), ("captions", 5 * images)):
      lines = _lines(text, f"toy/{split} {record_set}")
      assert lines[0].startswith(f"toy/{split} {record_set}: 1/{total} {record_set}")
      assert lines[-1].startswith(
        f"toy/{split} {record_set}: {total}/{total} {record_set}, done in"
      )


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
  """Tiny synthetic data opened as a run does, and a freshly initialised model."""
  config = tiny_config(tmp_path_factory.mktemp("data"))
  config.progress.delay_s = 0.0
  data = dataset.open_data(config, str(tmp_path_factory.mktemp("run")), log=print)
  model = build_model(config.model, data.vocab_size, execution.resolve())
  split = data.train
  variables = model.init(
    {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
    np.zeros((2, split.num_regions, split.feature_dim), np.float32),
    np.ones((2, data.caption_len), np.int32),
    np.full((2,), 3, np.int32),
    train=False,
  )
  mesh = sharding.make_mesh(config.mesh.data)
  return config, data, model, jax.device_put(variables, sharding.replicated(mesh)), mesh


@pytest.mark.parametrize("enabled", [True, False])
def test_all_pairs_scoring_reports_tiles_pairs_per_second_and_eta(
  run_setup, capsys, enabled
):
  config, data, model, variables, mesh = run_setup
  config = config.copy_and_resolve_references()
  config.progress.enabled = enabled
  split = data.test  # 10 images x 50 captions; tiles of 8 x 16
  evaluate = evaluator.for_config(
    config, model, split, mesh, execution.resolve(config.execution),
    caption_len=data.caption_len,
  )  # fmt: skip
  sims, _ = evaluate.similarity(variables)
  assert sims.shape == (10, 50)
  lines = _lines(capsys.readouterr().out, "test scoring")
  if not enabled:
    assert lines == []
    return
  tiles = 2 * 4  # ceil(10 / 8) image tiles x ceil(50 / 16) caption tiles
  assert [int(s.split()[2].split("/")[0]) for s in lines] == list(range(1, tiles + 1))
  assert all(s.split()[2].endswith(f"/{tiles}") for s in lines)
  assert all(
    re.search(r"tiles, [\d,.]+ pairs/s, ETA \d+:\d\d$", s) for s in lines[1:-1]
  )
  assert re.search(r"8/8 tiles, done in \d+:\d\d$", lines[-1])


def test_selection_pass_reports_batches_and_eta(run_setup, capsys):
  config, data, model, variables, mesh = run_setup
  stats = selection.pair_statistics(
    model, variables, data, config, mesh, tau=0.05, temp=1.0
  )
  assert stats["ce"].shape == (data.train.n_captions,)
  text = capsys.readouterr().out
  assert "\r" not in text
  lines = _lines(text, "selection statistics")
  batches = -(-data.train.n_captions // config.train.batch_size)  # 120 / 16 -> 8
  assert [s.split()[2] for s in lines] == [f"{k}/{batches}" for k in range(1, 9)]
  assert all("pairs/s, ETA" in s for s in lines[1:-1])
  assert "done in" in lines[-1]


def test_a_run_prepares_its_data_with_progress(tmp_path, capsys):
  config = tiny_config(tmp_path / "data")
  config.progress.delay_s = 0.0
  dataset.ensure_prepared(config.data, lambda message: None, config.progress)
  text = capsys.readouterr().out
  lines = _lines(text, "synthetic_precomp/train images")
  assert lines[-1].startswith("synthetic_precomp/train images: 24/24 images, done in")
  config.progress.enabled = False
  config.data.prepared_dir = str(tmp_path / "again")
  dataset.ensure_prepared(config.data, lambda message: None, config.progress)
  assert capsys.readouterr().out == ""
