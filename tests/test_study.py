"""The study command: its plan, its table, and a tiny real study end to end."""

import json
import os
import subprocess
import sys

import pytest
import xla_env

from srem_jax import study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402


def tiny_base():
  c = demo.get_config()
  syn = c.data.synthetic
  syn.num_train, syn.num_dev, syn.num_test = 24, 10, 10
  syn.num_regions, syn.feature_dim, syn.num_concepts = 4, 16, 12
  c.model.img_dim, c.model.embed_dim, c.model.word_dim, c.model.sim_dim = 16, 16, 8, 8
  c.mesh.data = 1
  c.train.batch_size = 16
  c.train.epochs = 2
  c.train.warmup_epochs = c.train.lr_decay_epochs = 1
  c.train.log_every_steps = 100
  c.eval.batch_size, c.execution.img_tile, c.execution.cap_tile = 16, 8, 16
  return c


def test_default_plan_has_every_setting_once():
  settings = study.plan([0, 0.2, 0.4, 0.6, 0.8], study.METHODS)
  assert len(settings) == 5 * 4 + 4 + 4
  names = [s.run_name(1) for s in settings]
  assert len(set(names)) == len(names)
  assert "caption0.6_srem_no_cmbcl_s1" in names
  assert "image0.4_ccl_s1" in names and "caption0_triplet_hardest_s1" in names
  assert "caption0.4_ncr_s1" in names and "image0.4_ncr_s1" in names
  ablations = [s for s in settings if s.method.startswith("srem ")]
  assert {s.ratio for s in ablations} == {0.6}
  config = study.run_config(tiny_base(), ablations[2], seed=3, data_dir="/d")
  assert config.loss.beta == 0.0 and config.loss.name == "srem"
  assert (config.noise.seed, config.train.seed, config.noise.ratio) == (3, 3, 0.6)
  assert config.data.raw_dir == "/d" and config.name == "caption0.6_srem_beta0_s3"
  assert len(study.plan([0.2], ["srem"], [], [0.4, 0.6])) == 1 + 2 * 4
  assert study.plan([0.2], ["ccl"], [], [0.6]) == [
    study.Setting("caption", 0.2, "ccl", (("loss.name", "ccl"),))
  ]


def test_clean_phase_factors_change_one_field_each():
  settings = study.plan([0.6], ["srem", "ccl"], [], [0.6], [0.6])
  factors = [s for s in settings if s.method in study.CLEAN_PHASE]
  assert [s.method for s in factors] == list(study.CLEAN_PHASE)
  # "srem beta=0" is an ablation and a factor: at a shared ratio it runs once.
  assert len(settings) == 2 + len(study.ABLATIONS) + len(study.CLEAN_PHASE) - 1
  assert len({s.run_name(0) for s in settings}) == len(settings)
  assert len(study.plan([0.6], ["srem"], [], [0.6], [0])) == 1 + 4 + 5
  base = tiny_base()
  for setting in factors:
    config = study.run_config(base, setting, seed=1, data_dir="/d")
    changed = {
      f"{group}.{field}"
      for group in ("loss", "train")
      for field in base[group]
      if config[group][field] != base[group][field]
    }
    assert changed == {key for key, _ in setting.overrides} | {"train.seed"}
    assert config.loss.name == "srem" and config.noise.ratio == 0.6
  no_drop = study.run_config(base, factors[-1], seed=0, data_dir="/d")
  assert no_drop.train.lr_decay_factor == 1.0 and no_drop.name.endswith("no_lr_drop_s0")
  assert study.plan([0.6], ["ccl"], [], [], [0.6]) == study.plan([0.6], ["ccl"], [], [])


def test_table_cells_are_mean_and_sample_std_over_seeds():
  setting = study.Setting("caption", 0.4, "srem")
  runs = {
    (setting, seed): study.RunSummary(
      test={"rsum": rsum, "i2t_r1": 10.0, "t2i_r1": r1},
      last_train={"selection_precision": 0.5 + seed / 10, "selection_recall": "nan"},
      train_epochs=[],
      warmup_epochs=0,
    )
    for seed, rsum, r1 in ((0, 100.0, 4.0), (1, 200.0, 8.0))
  }
  row = study.table([setting], [0, 1], runs).splitlines()[2]
  cells = [c.strip() for c in row.strip("|").split("|")]
  # std with ddof=1 of (100, 200) is 70.71; of (4, 8) is 2.83.
  assert cells == [
    "caption 40%",
    "srem",
    "150.0 ± 70.7",
    "10.0 ± 0.0",
    "6.0 ± 2.8",
    "0.550 ± 0.071",
    "-",
  ]
  # With a warm-up, a column of validation rSum after it (missing epochs: "-").
  runs[setting, 0].val_epochs = [{"epoch": 2, "rsum": 30.0}, {"epoch": 3, "rsum": 50}]
  runs[setting, 1].val_epochs = [{"epoch": 3, "rsum": 70.0}]
  lines = study.table([setting], [0, 1], runs, warmup_epochs=3).splitlines()
  assert "| val rSum @3 (seeds ≥ 100) |" in lines[0] and lines[1].count("---:") == 6
  assert [c.strip() for c in lines[2].strip("|").split("|")][2:4] == [
    "60.0 ± 14.1 (0/2)",
    "150.0 ± 70.7",
  ]
  runs[setting, 1].val_epochs = [{"epoch": 3, "rsum": 100.0}]
  assert "| 75.0 ± 35.4 (1/2) |" in study.table([setting], [0, 1], runs, 3)
  runs[setting, 1].val_epochs = []
  assert "| 50.0 ± 0.0 (0/2) |" in study.table([setting], [0, 1], runs, 3)


def test_paired_table_subtracts_srem_of_the_same_noise_and_seed():
  srem, ccl = (
    study.Setting("caption", 0.4, "srem"),
    study.Setting("caption", 0.4, "ccl"),
  )
  other = study.Setting("caption", 0.2, "ccl")  # no SREM at 20%: no row
  rsums = {srem: (100.0, 300.0, 200.0), ccl: (110.0, 290.0, 230.0), other: (1, 2, 3)}
  runs = {
    (s, seed): study.RunSummary({"rsum": v}, {}, [], 0)
    for s, values in rsums.items()
    for seed, v in enumerate(values)
  }
  lines = study.paired_table([srem, ccl, other], [0, 1, 2], runs).splitlines()
  # Differences +10, -10, +30: mean 10, sample std 20.
  assert lines[2:] == [
    "| caption 40% | ccl | +10.0 ± 20.0 | 2/3 | +10.0 / -10.0 / +30.0 |"
  ]
  assert study.paired_table([other], [0, 1, 2], runs) is None
  # A study run in parts: a seed not trained yet is a dash, a setting with no
  # finished seed a row that says so, with the table's number of columns.
  del runs[ccl, 1]
  lines = study.paired_table([srem, ccl], [0, 1, 2], runs).splitlines()
  assert lines[2:] == ["| caption 40% | ccl | +20.0 ± 14.1 | 2/2 | +10.0 / — / +30.0 |"]
  missing = study.Setting("image", 0.4, "srem")
  for warmup in (0, 8):
    lines = study.table([srem, missing], [0, 1, 2], runs, warmup).splitlines()
    assert lines[3].startswith("| image 40% | srem | not trained yet |")
    assert lines[3].count("|") == lines[2].count("|") == lines[0].count("|")


TINY_FLAGS = [
  "--num_train=24",
  "--epochs=2",
  "--config.data.synthetic.num_dev=10",
  "--config.data.synthetic.num_test=10",
  "--config.data.synthetic.num_regions=4",
  "--config.data.synthetic.feature_dim=16",
  "--config.data.synthetic.num_concepts=12",
  "--config.model.img_dim=16",
  "--config.model.embed_dim=16",
  "--config.model.word_dim=8",
  "--config.model.sim_dim=8",
  "--config.mesh.data=1",
  "--config.train.batch_size=16",
  "--config.train.log_every_steps=100",
  "--config.eval.batch_size=16",
  "--config.execution.img_tile=8",
  "--config.execution.cap_tile=16",
]


def run_command(args, cwd):
  return subprocess.run(
    [sys.executable, "-m", "srem_jax.study", *args],
    cwd=cwd,
    env=xla_env.subprocess_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_paired_against_a_baseline_lists_srem_and_its_readings():
  ccl = study.Setting("caption", 0.4, "ccl")
  srem = study.Setting("caption", 0.4, "srem")
  r1 = study.Setting("caption", 0.4, "srem r1")
  ncr = study.Setting("caption", 0.4, "ncr")
  rsums = {ccl: (100.0, 200.0), srem: (90.0, 230.0), r1: (130.0, 210.0), ncr: (0, 0)}
  runs = {
    (s, seed): study.RunSummary({"rsum": v}, {}, [], 0)
    for s, values in rsums.items()
    for seed, v in enumerate(values)
  }
  lines = study.paired_table([ccl, srem, r1, ncr], [0, 1], runs, "ccl").splitlines()
  assert "test rSum − ccl's" in lines[0]
  # SREM: -10, +30 (one seed ahead); r1: +30, +10; NCR is no row against ccl.
  assert lines[2:] == [
    "| caption 40% | srem | +10.0 ± 28.3 | 1/2 | -10.0 / +30.0 |",
    "| caption 40% | srem r1 | +20.0 ± 14.1 | 2/2 | +30.0 / +10.0 |",
  ]


def test_plan_trains_each_reading_at_every_noise_condition():
  settings = study.plan([0.2, 0.4], ["ccl"], [0.4], (), (), ["r1", "r2"])
  readings = [s for s in settings if s.method.startswith("srem")]
  assert len(readings) == 6 and len(settings) == 9
  r1 = next(s for s in readings if s.method == "srem r1")
  assert dict(r1.overrides) == {"loss.name": "srem", "loss.reading": "r1"}
  assert r1.run_name(3) == "caption0.2_srem_r1_s3"


@pytest.mark.slow
def test_tiny_study_writes_table_and_figures_and_resumes(tmp_path):
  out = tmp_path / "study"
  args = [
    f"--out={out}",
    "--ratios=0,0.6",
    "--methods=srem",
    "--image_ratios=",
    "--noablations",
    "--jobs=2",
    *TINY_FLAGS,
  ]
  result = run_command(args, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  text = (out / "study.md").read_text()
  assert f"- command: `python -m srem_jax.study {args[0]}" in text
  assert "jax 0.10.2" in text and "24 training images" in text
  rows = [line for line in text.splitlines() if line.startswith("| caption")]
  assert [r.split("|")[1:3] for r in rows] == [
    [" caption 0% ", " srem "],
    [" caption 60% ", " srem "],
  ]
  for run in ("caption0_srem_s0", "caption0.6_srem_s0"):  # run in worker processes
    assert "val rSum" in (out / "runs" / f"{run}.log").read_text()
  head = [c.strip() for c in text.split("| setting |")[1].splitlines()[0].split("|")]
  test_col = head.index("test rSum") + 2
  warm_col = head.index("val rSum @1 (seeds ≥ 100)") + 2
  for row, run in zip(rows, ("caption0_srem_s0", "caption0.6_srem_s0")):
    saved = json.loads((out / "runs" / run / "results.json").read_text())
    assert float(row.split("|")[test_col]) == round(saved["test"]["rsum"], 1)
    first_val = json.loads(
      next(
        line
        for line in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()
        if '"split": "val"' in line
      )
    )
    assert first_val["epoch"] == 1
    value, seeds_past = row.split("|")[warm_col].split()
    assert float(value) == round(first_val["rsum"], 1)
    assert seeds_past == f"({int(first_val['rsum'] >= 100)}/1)"
    assert saved["config"]["train"]["epochs"] == 2
  figures = ("rsum_vs_noise.png", "selection_srem.png", "energy_entropy_srem.png")
  for name in (*figures, "energy_entropy_hist_srem.png"):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert f"]({name})" in text
  # Rerunning skips finished runs and rewrites the same table.
  base = tiny_base()  # the same data as the flags above
  settings = study.plan([0.0, 0.6], ["srem"], [], ())
  before = {p: os.path.getmtime(p) for p in (out / "runs").glob("*/results.json")}
  again = open(study.run_study(base, str(out), settings, [0], "again")).read()
  assert {p: os.path.getmtime(p) for p in before} == before
  assert [r for r in again.splitlines() if r.startswith("|")] == [
    r for r in text.splitlines() if r.startswith("|")
  ]
  # Reporting only: a setting not trained yet is counted, nothing is trained.
  extra = study.Setting("caption", 0.2, "srem", (("loss.name", "srem"),))
  partial = open(
    study.run_study(base, str(out), [*settings, extra], [0], "part", train=False)
  ).read()
  assert "- unfinished: 1 of 3 runs" in partial
  assert "| caption 20% | srem | not trained yet |" in partial
  assert not (out / "runs" / extra.run_name(0)).exists()
  base.data.synthetic.num_train = 30
  with pytest.raises(study.UserError, match="data.json: .*num_train differ"):
    study.run_study(base, str(out), settings, [0], "again")


@pytest.mark.parametrize(
  "args, message",
  [
    (["--methods=srem,nope"], "--methods: expected some of srem"),
    (["--out=o", "--readings=r1,r10"], "--readings: expected some of r0"),
    (["--out=o", "--ratios=0,1.2"], "--ratios: ratios must lie in"),
    ([], "--out is required"),
  ],
)
def test_command_line_mistakes_are_one_line(args, message, tmp_path):
  if args and args[0] == "--methods=srem,nope":
    args = [f"--out={tmp_path}", *args]
  result = run_command(args, tmp_path)
  assert result.returncode == 2
  assert result.stderr.startswith(f"error: {message}"), result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
