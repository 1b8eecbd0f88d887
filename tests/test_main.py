"""The whole main job on a tiny synthetic dataset: outputs, resume, preemption."""

import json
import os
import signal
import subprocess
import sys

import chex
import events
import jax.numpy as jnp
import numpy as np
import pytest
import xla_env

from srem_jax import checkpoint, evaluate, train
from srem_jax.errors import UserError
from srem_jax.eval import retrieval
from srem_jax.methods import losses
from srem_jax.train import srem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402

# Every test here trains (or evaluates) the whole main job: minutes on 2 cores.
pytestmark = pytest.mark.slow


def tiny_config(data_dir, **train_overrides):
  c = demo.get_config()
  c.data.raw_dir = str(data_dir)
  syn = c.data.synthetic
  syn.num_train, syn.num_dev, syn.num_test = 24, 10, 10
  syn.num_regions, syn.feature_dim, syn.num_concepts = 4, 16, 12
  c.model.img_dim, c.model.embed_dim, c.model.word_dim, c.model.sim_dim = 16, 16, 8, 8
  c.mesh.data = 1  # 8-device equivalence is tested in test_train; compile less here
  c.train.batch_size = 16
  c.train.epochs = 2
  c.train.warmup_epochs = 1
  c.train.lr_decay_epochs = 1
  c.train.log_every_steps = 2
  c.eval.batch_size = 16
  c.execution.img_tile = 8
  c.execution.cap_tile = 16
  for key, value in train_overrides.items():
    c.train[key] = value
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  results = train.train_and_evaluate(tiny_config(data_dir), str(workdir))
  return workdir, results


def latest_params(workdir):
  variables, _ = checkpoint.load_variables(os.path.join(workdir, "checkpoints"))
  return variables


def test_outputs_of_a_run(full_run):
  workdir, results = full_run
  assert (workdir / "results.json").is_file()
  saved = json.loads((workdir / "results.json").read_text())
  test = saved["test"]
  for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
    assert 0 <= test[key] <= (600 if key == "rsum" else 100)
  assert test["rsum"] == pytest.approx(sum(test[k] for k in test if "_r" in k[3:]))
  assert saved["noise"]["protocol"] == "caption"
  assert saved["noise"]["clean_fraction"] < 1.0
  assert os.path.isfile(saved["noise"]["file"])
  assert saved["config"]["loss"]["name"] == "srem"
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  splits = [r["split"] for r in records]
  assert splits == ["train", "val", "train", "val", "test"]
  train_record = records[2]
  for key in (
    "step",
    "epoch",
    "loss",
    "loss_clean",
    "loss_cmbcl",
    "selected_frac",
    "selection_precision",
    "selection_recall",
    "energy_clean",
    "energy_noisy",
    "entropy_clean",
    "entropy_noisy",
  ):
    assert key in train_record, key
  assert records[0]["warmup"] and not records[2]["warmup"]
  # Warm-up trains on every pair, so "selected" is everything and its
  # precision is the clean fraction of the data.
  assert records[0]["selected_frac"] == 1.0
  assert records[0]["selection_recall"] == 1.0
  assert (workdir / "best").is_dir() and (workdir / "checkpoints").is_dir()
  assert (workdir / "plots" / "energy_entropy_hist.png").is_file()
  with np.load(workdir / "plots" / "pairs_last_epoch.npz") as pairs:
    assert int(pairs["epoch"]) == 2
    steps = train_record["step"] - records[0]["step"]
    assert pairs["energy"].shape == (steps * 16,)  # every pair of the epoch
    truth = pairs["truly_clean"]
    for key in ("energy", "entropy"):
      for group, rows in (("clean", truth), ("noisy", ~truth)):
        mean = pairs[key][rows].mean()
        assert mean == pytest.approx(train_record[f"{key}_{group}"], rel=1e-4)
  check_events(workdir, records, truth)
  # Validation of epoch 2 and the final test reused epoch 1's compiled functions.
  assert retrieval.eval_functions.cache_info().hits >= 2


def check_events(workdir, records, last_truth):
  """The run's TensorBoard file holds what metrics.jsonl and plots/ hold."""
  # The first file is this run's; the rerun below opens one of its own.
  first = events.event_files(workdir / "tensorboard")[0]
  written = events.values(events.read_best(first))
  kinds = {
    kind: {(s, v.tag): v for s, v in written if v.HasField(kind)}
    for kind in ("simple_value", "histo", "image")
  }
  scalars = {key: v.simple_value for key, v in kinds["simple_value"].items()}
  fields = {"train": ("loss", "selection_precision"), "val": ("rsum", "i2t_r1")}
  for record in records:
    for key in fields.get(record["split"], ("rsum",)):
      tag = f"{record['split']}/{key}"
      assert scalars[record["step"], tag] == pytest.approx(record[key], rel=1e-6)
  epoch_steps = [records[0]["step"], records[2]["step"]]
  figures = {"loss", "val_rsum", "selection", "energy_entropy", "energy_entropy_hist"}
  for step in epoch_steps:
    assert {tag for s, tag in kinds["image"] if s == step} == {
      f"plots/{name}" for name in figures
    }
  histos = kinds["histo"]
  for key in ("energy", "entropy"):
    assert histos[epoch_steps[1], f"pairs/{key}_truly_clean"].histo.num == (
      last_truth.sum()
    )
    assert histos[epoch_steps[1], f"pairs/{key}_truly_noisy"].histo.num == (
      (~last_truth).sum()
    )
  assert (0, "config/text_summary") in {(s, v.tag) for s, v in written}
  hparams = {
    (s, v.tag) for s, v in written if v.metadata.plugin_data.plugin_name == "hparams"
  }
  assert (records[-1]["step"], "_hparams_/session_start_info") in hparams


def test_rerun_of_a_finished_run_changes_nothing(full_run, data_dir):
  workdir, results = full_run
  before = latest_params(workdir)
  again = train.train_and_evaluate(tiny_config(data_dir), str(workdir))
  assert again["test"] == results["test"]
  chex.assert_trees_all_equal(latest_params(workdir), before)


def test_resume_after_an_epoch_equals_uninterrupted(full_run, data_dir, tmp_path):
  workdir, results = full_run
  train.train_and_evaluate(tiny_config(data_dir, epochs=1), str(tmp_path))
  resumed = train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))
  chex.assert_trees_all_equal(latest_params(tmp_path), latest_params(workdir))
  assert resumed["test"] == results["test"]


def test_sigterm_mid_epoch_saves_and_resumes_exactly(
  full_run, data_dir, tmp_path, monkeypatch
):
  workdir, results = full_run
  real_make = srem.make_train_step
  calls = {"n": 0}

  def make_with_signal(*args, **kwargs):
    step = real_make(*args, **kwargs)

    def stepped(state, batch):
      calls["n"] += 1
      if calls["n"] == 3:  # inside the first epoch (7 steps each)
        os.kill(os.getpid(), signal.SIGTERM)
      return step(state, batch)

    return stepped

  monkeypatch.setattr(srem, "make_train_step", make_with_signal)
  with pytest.raises(SystemExit) as exit_info:
    train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))
  assert exit_info.value.code == 0
  interrupted = checkpoint.Checkpointer(str(tmp_path))
  assert interrupted.latest.latest_step() == 3
  interrupted.close()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  monkeypatch.setattr(srem, "make_train_step", real_make)
  resumed = train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))
  chex.assert_trees_all_equal(latest_params(tmp_path), latest_params(workdir))
  assert resumed["test"] == results["test"]


def test_non_finite_loss_stops_with_a_clear_message(
  full_run, data_dir, tmp_path, monkeypatch
):
  real_objective = losses.objective

  def exploding(scores, **kwargs):
    loss, aux = real_objective(scores, **kwargs)
    aux = dict(aux, loss=aux["loss"] * jnp.nan, loss_cmbcl=aux["loss_cmbcl"] * jnp.nan)
    return loss * jnp.nan, aux

  monkeypatch.setattr(losses, "objective", exploding)
  with pytest.raises(UserError, match=r"non-finite loss by step 2 \(loss=nan"):
    train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))


def test_evaluate_reproduces_the_final_test_and_averages_an_ensemble(
  full_run, data_dir, tmp_path
):
  workdir, results = full_run
  config = tiny_config(data_dir)
  best_sims, latest_sims = tmp_path / "best.npy", tmp_path / "latest.npy"
  alone = evaluate.run_evaluation(
    config, [str(workdir)], dump_sims=str(best_sims), workdir=str(tmp_path / "a")
  )
  for key, value in results["test"].items():
    assert alone[key] == pytest.approx(value, abs=1e-9), key
  assert (
    json.loads((tmp_path / "a" / "results.json").read_text())["rsum"] == alone["rsum"]
  )
  evaluate.run_evaluation(
    config,
    [str(workdir / "checkpoints")],
    dump_sims=str(latest_sims),
    workdir=str(tmp_path / "b"),
  )
  both = tmp_path / "both.npy"
  evaluate.run_evaluation(
    config,
    [str(workdir), str(workdir / "checkpoints")],
    dump_sims=str(both),
    workdir=str(tmp_path / "c"),
  )
  expected = (np.load(best_sims).astype(np.float64) + np.load(latest_sims)) / 2
  np.testing.assert_allclose(np.load(both), expected, rtol=1e-6)
  assert np.load(both).shape == (10, 50)


def test_evaluate_command_line_coco_protocol(full_run, data_dir, tmp_path):
  workdir, _ = full_run
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "srem_jax.evaluate",
      f"--config={REPO}/configs/demo.py",
      f"--config.data.raw_dir={data_dir}",
      "--config.mesh.data=1",
      "--config.model.img_dim=16",
      "--config.model.embed_dim=16",
      "--config.model.word_dim=8",
      "--config.model.sim_dim=8",
      f"--checkpoint={workdir}",
      "--protocol=coco",
      f"--workdir={tmp_path}",
    ],
    env=xla_env.subprocess_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  saved = json.loads((tmp_path / "results.json").read_text())
  assert set(saved) >= {"coco1k", "coco5k", "split", "protocol", "checkpoints"}
  assert "coco1k" in result.stdout and "coco5k" in result.stdout


def test_epoch_gmm_selection_runs_and_selects(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.loss.selection = "epoch_gmm"
  train.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  after_warmup = [r for r in records if r["split"] == "train" and not r["warmup"]]
  # After warm-up the selection comes from the mixture fit, not the batch rule:
  # it is no longer "everything", and it was saved with the run.
  assert after_warmup and after_warmup[0]["selected_frac"] < 1
  restored = checkpoint.Checkpointer(str(tmp_path))
  saved = restored.latest.restore(
    restored.latest.latest_step(),
    args=checkpoint.ocp.args.Composite(selection=checkpoint.ocp.args.StandardRestore()),
  ).selection
  restored.close()
  assert saved.shape == (120,) and saved.dtype == bool
