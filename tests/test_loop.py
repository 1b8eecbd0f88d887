"""The training loop against a plain step-by-step loop over `make_train_step`.

The loop prefetches batches to the devices, sums the metrics inside the jitted
step and runs each step under `jax.transfer_guard("disallow")`. The reference
here is the simplest loop the step allows: the unsummed step, one batch at a
time, the metrics summed by eager additions on the host's command. The two
loops feed the same batches and masks to the same gradient computation, so the
final parameters agree bit for bit. The metrics are forward values (the loss
and its parts are reductions over the batch) that the compiler is free to fuse
differently once the summed step adds them to the running sums, so they agree
to float32 rounding: under the default reading a few of 21 steps differ in
the last bit of the loss.
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_main import tiny_config

from srem_jax import sharding, train
from srem_jax.report import diagnostics
from srem_jax.train import run as train_run
from srem_jax.train import srem, step

pytestmark = pytest.mark.slow  # two short runs of the main job

EPOCHS = 3  # 7 steps each: 21 steps


def config_for(data_dir):
  config = tiny_config(data_dir, epochs=EPOCHS, log_every_steps=3)
  config.loss.selection = "epoch_gmm"
  config.profile.start_step = 2
  config.profile.num_steps = 3
  return config


def fixed_selection(n_captions, epoch):
  """A stand-in for the selection pass: a seeded mask per epoch."""
  return np.random.default_rng(epoch).random(n_captions) < 0.6


def reference_run(config, workdir):
  """The step-by-step loop: returns the final state and the sums after each step."""
  run = train_run.open_run(
    config, workdir, lambda spe: step.make_optimizer(config.train, spe)
  )
  state, selection, _ = srem.initial_state(run)
  spe, history, summaries = run.steps_per_epoch, [], []
  loss_kw = step.loss_options(config.loss)
  external = config.loss.selection == "epoch_gmm"
  for epoch in range(config.train.epochs):
    warmup = epoch < config.train.warmup_epochs
    clean_given = external and not warmup
    steps = {}
    sums = None
    for _ in range(spe):
      batch = next(run.loader)
      if clean_given:
        batch["selected"] = selection[batch["cap_index"]]
      key = batch["tokens"].shape[1]
      if key not in steps:
        steps[key] = step.make_train_step(
          run.model,
          run.tx,
          loss_kw,
          run.mesh,
          warmup=warmup,
          external_selection=clean_given,
        )
      state, metrics = steps[key](state, sharding.global_batch(batch, run.mesh))
      metrics.pop(step.PAIRS)
      metrics["steps"] = 1.0
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
      history.append(jax.device_get(sums))
    summaries.append(diagnostics.epoch_summary(sums))
    if external and epoch + 1 >= config.train.warmup_epochs:
      selection = fixed_selection(run.data.train.n_captions, epoch)
  run.loader.close()
  run.ckpt.close()
  return state, history, summaries


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


def test_loop_equals_the_step_by_step_loop_under_a_transfer_guard(
  data_dir, tmp_path, monkeypatch
):
  # Epoch 1 is the warm-up; epochs 2 and 3 take their clean mask from the
  # (stand-in) selection pass, through the prefetched batches.
  config = config_for(data_dir)
  want_state, want_history, want_summaries = reference_run(
    config, str(tmp_path / "reference")
  )

  real_make = step.make_train_step
  history, guards, last = [], [], {}

  def recording(*args, **kwargs):
    made = real_make(*args, **kwargs)

    def stepped(carry, batch):
      guards.append(jax.config.jax_transfer_guard_host_to_device)
      with pytest.raises(jax.errors.JaxRuntimeError, match="Disallowed"):
        jnp.add(np.ones(2, np.float32), 1)  # an implicit transfer: refused
      carry, pairs = made(carry, batch)
      history.append(jax.device_get(carry[1]))
      last["state"] = jax.device_get(carry[0])
      return carry, pairs

    return stepped

  def selection_pass(config, model, state, data, mesh, features, plan):
    return fixed_selection(
      data.train.n_captions, int(jax.device_get(state.step)) // 7 - 1
    )

  monkeypatch.setattr(srem, "make_train_step", recording)
  monkeypatch.setattr(srem, "gmm_selection", selection_pass)
  workdir = tmp_path / "loop"
  train.train_and_evaluate(config, str(workdir))

  assert len(history) == len(want_history) == EPOCHS * 7 >= 20
  assert guards == ["disallow"] * len(history)
  for got, want in zip(history, want_history):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_allclose(got[key], np.float32(want[key]), rtol=1e-6, err_msg=key)
  chex.assert_trees_all_equal(last["state"], jax.device_get(want_state), strict=True)
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train_records = [r for r in records if r["split"] == "train"]
  assert len(train_records) == EPOCHS
  for got, want in zip(train_records, want_summaries):
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-6, abs=0, nan_ok=True)
  trace_files = [f for _, _, names in os.walk(workdir / "profile") for f in names]
  assert any(name.endswith(".xplane.pb") for name in trace_files), trace_files
