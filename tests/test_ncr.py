"""NCR in the framework: its losses against float64 loops, the division by
hand, and a tiny run that resumes exactly after SIGTERM and evaluates."""

import json
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_main import tiny_config

from srem_jax import checkpoint, evaluate, train
from srem_jax.methods import ncr
from srem_jax.train import co_training

MARGIN = 0.2


def _scores(seed, K=7):
  return np.random.default_rng(seed).uniform(-0.2, 1.0, size=(K, K))


def _costs_ref(S, margin_s, margin_im):
  """c_s[i, j] = [M_s[i, j] + S_ij - S_ii]₊, c_im[i, j] = [M_im[i, j] + S_ij -
  S_jj]₊, diagonals 0, by loops in float64."""
  K = S.shape[0]
  c_s, c_im = np.zeros((K, K)), np.zeros((K, K))
  for i in range(K):
    for j in range(K):
      if i != j:
        c_s[i, j] = max(margin_s[i, j] + S[i, j] - S[i, i], 0.0)
        c_im[i, j] = max(margin_im[i, j] + S[i, j] - S[j, j], 0.0)
  return c_s, c_im


def _full(value, K):
  return np.broadcast_to(np.asarray(value, np.float64), (K, K))


def _predict_ref(S, margin):
  K = S.shape[0]
  c_s, c_im = _costs_ref(S, _full(margin, K), _full(margin, K))
  p = np.array(
    [margin - (c_s[k].sum() / K + c_im[:, k].sum() / K) / 2 for k in range(K)]
  )
  p = np.clip(p, 0, margin)
  top = sorted(p)[-(K // 10 + 1) :]
  return np.clip(p / np.mean(top), 0, 1) if np.mean(top) > 0 else np.zeros(K)


def _exponential(y):
  return (10.0**y - 1) / 9


def test_warmup_and_per_sample_losses_match_loops():
  S = _scores(0)
  K = S.shape[0]
  c_s, c_im = _costs_ref(S, _full(MARGIN, K), _full(MARGIN, K))
  expected = sum(c_s[i].sum() / K for i in range(K)) + sum(
    c_im[:, j].sum() / K for j in range(K)
  )
  np.testing.assert_allclose(
    ncr.warmup_loss(jnp.asarray(S, jnp.float32)), expected, rtol=1e-5
  )
  per_sample = [c_s[k].sum() / K + c_im[:, k].sum() / K for k in range(K)]
  np.testing.assert_allclose(ncr.per_sample_loss(jnp.float32(S)), per_sample, rtol=1e-5)
  # Padded pairs leave every mean: the valid block alone is the reference.
  valid = np.array([True, True, False, True, True, False, True])
  sub = S[np.ix_(valid, valid)]
  n = valid.sum()
  c_s, c_im = _costs_ref(sub, _full(MARGIN, n), _full(MARGIN, n))
  masked = ncr.per_sample_loss(jnp.float32(S), MARGIN, jnp.asarray(valid))
  np.testing.assert_allclose(
    np.asarray(masked)[valid],
    [c_s[k].sum() / n + c_im[:, k].sum() / n for k in range(n)],
    rtol=1e-5,
  )
  assert np.all(np.asarray(masked)[~valid] == 0)


def test_prediction_matches_the_loop_and_is_zero_when_no_pair_wins():
  for seed in range(3):
    S = _scores(seed, K=12)
    np.testing.assert_allclose(
      ncr.predict(jnp.float32(S), MARGIN), _predict_ref(S, MARGIN), rtol=1e-5, atol=1e-6
    )
  # Every pair scores below all its negatives: each p clamps to 0.
  losing = 1.0 - np.eye(5)
  assert np.all(np.asarray(ncr.predict(jnp.float32(losing), MARGIN)) == 0)


@pytest.mark.parametrize(
  "kind, s",
  [
    ("exponential", _exponential),
    ("linear", lambda y: y),
    ("sin", lambda y: np.sin(np.pi * y - np.pi / 2) / 2 + 0.5),
  ],
)
def test_soft_margins(kind, s):
  y = np.array([0.0, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(
    ncr.soft_margin(jnp.float32(y), MARGIN, kind), MARGIN * s(y), rtol=1e-6, atol=1e-7
  )


def _hardest_ref(S, margin_s, margin_im):
  """Value and gradient (d loss / d S) of the summed hardest-negative triplet."""
  K = S.shape[0]
  c_s, c_im = _costs_ref(S, margin_s, margin_im)
  loss, grad = 0.0, np.zeros((K, K))
  for i in range(K):
    j = int(np.argmax(c_s[i]))
    loss += c_s[i, j]
    if c_s[i, j] > 0:
      grad[i, j] += 1
      grad[i, i] -= 1
  for j in range(K):
    i = int(np.argmax(c_im[:, j]))
    loss += c_im[i, j]
    if c_im[i, j] > 0:
      grad[i, j] += 1
      grad[j, j] -= 1
  return loss, grad


def test_labelled_loss_uses_a_margin_per_pair_from_the_k_by_k_target():
  S = _scores(1)
  K = S.shape[0]
  rng = np.random.default_rng(5)
  prob, p_self = rng.uniform(size=K), rng.uniform(size=K)
  # The target of NCR's code: (K, 1) prob and label times a (K,) prediction.
  target = np.array(
    [[prob[i] + (1 - prob[i]) * p_self[j] for j in range(K)] for i in range(K)]
  )
  np.testing.assert_allclose(
    ncr.labelled_target(jnp.float32(prob), jnp.float32(p_self)), target, rtol=1e-6
  )
  margins = MARGIN * _exponential(target)
  expected, expected_grad = _hardest_ref(S, margins, margins)
  args = jnp.float32(prob), jnp.float32(p_self)
  loss, grad = jax.value_and_grad(lambda s: ncr.labelled_loss(s, *args, MARGIN))(
    jnp.float32(S)
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


def test_unlabelled_loss_uses_one_margin_per_row_in_both_directions():
  S = _scores(2)
  K = S.shape[0]
  target = np.random.default_rng(6).uniform(size=K)
  rows = MARGIN * _exponential(target)[:, None] * np.ones((1, K))
  expected, expected_grad = _hardest_ref(S, rows, rows)
  loss, grad = jax.value_and_grad(
    lambda s: ncr.unlabelled_loss(s, jnp.float32(target), MARGIN)
  )(jnp.float32(S))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


def test_split_by_threshold_and_the_one_percent_rule():
  prob = np.array([0.9, 0.2, 0.7, 0.5, 0.51])
  np.testing.assert_array_equal(
    ncr.split_labelled(prob, 0.5), [True, False, True, False, True]
  )
  # Every posterior above the threshold: the N // 100-th smallest (index 2 of
  # 250) becomes the threshold, so the three smallest are unlabelled.
  prob = np.linspace(0.6, 0.99, 250)[::-1].copy()
  labelled = ncr.split_labelled(prob, 0.5)
  assert np.flatnonzero(~labelled).tolist() == [247, 248, 249]
  # Fewer than 100 pairs: the smallest alone.
  assert np.flatnonzero(
    ~ncr.split_labelled(np.array([0.8, 0.7, 0.9]), 0.5)
  ).tolist() == [1]


def test_clean_probability_separates_two_loss_clusters():
  rng = np.random.default_rng(0)
  low = rng.normal(0.1, 0.02, 300)
  high = rng.normal(0.6, 0.05, 200)
  prob = ncr.clean_probability(np.concatenate([low, high]))
  assert np.all(prob[:300] > 0.99) and np.all(prob[300:] < 0.01)


def test_co_training_orders_cover_the_division():
  labelled = np.zeros(50, bool)
  labelled[[1, 4, 5, 9, 11, 20, 21, 22, 30, 31, 40]] = True  # 11 pairs
  steps, order_l, order_u = ncr.co_train_orders(3, 2, 1, labelled, 4)
  assert steps == 3  # ceil(11 / 4): the last batch is filled by a reshuffle
  assert order_l.size == order_u.size == 12
  assert sorted(order_l[:11]) == np.flatnonzero(labelled).tolist()
  assert labelled[order_l].all() and not labelled[order_u].any()
  assert len(set(order_u.tolist())) == 12  # 39 unlabelled: no repeat needed
  again = ncr.co_train_orders(3, 2, 1, labelled, 4)
  np.testing.assert_array_equal(again[1], order_l)  # a function of its seeds
  assert ncr.co_train_orders(3, 2, 1, labelled, 4, cap=2)[0] == 2
  assert not np.array_equal(ncr.co_train_orders(3, 2, 0, labelled, 4)[1], order_l)


# ---- a tiny NCR run through the product's commands ---------------------------


def ncr_config(data_dir):
  c = tiny_config(data_dir, epochs=3, warmup_epochs=1, lr_decay_epochs=2)
  c.loss.name = "ncr"
  c.ncr.unlabelled_from_epoch = 1  # the last epoch trains on unlabelled pairs too
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("ncr_data")


@pytest.fixture(scope="module")
def ncr_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ncr_full")
  results = train.train_and_evaluate(ncr_config(data_dir), str(workdir))
  return workdir, results


def _members(workdir):
  members, record = checkpoint.load_members(os.path.join(workdir, "checkpoints"))
  return members, record


@pytest.mark.slow
def test_ncr_run_records_division_and_keeps_both_models(ncr_run):
  workdir, results = ncr_run
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  train_records = [r for r in records if r["split"] == "train"]
  assert [r["warmup"] for r in train_records] == [True, False, False]
  for r in train_records[1:]:
    for m in co_training.MEMBERS:
      assert 0 < r[f"labelled_frac_{m}"] < 1
    assert r["loss_labelled"] > 0
  assert train_records[1]["loss_unlabelled"] == 0 < train_records[2]["loss_unlabelled"]
  assert all(r["time_train_s"] > 0 for r in train_records)
  members, record = _members(workdir)
  assert record["method"] == "ncr" and len(members) == 2
  a, b = (m["params"] for m in members)
  assert not np.allclose(
    jax.tree.leaves(a)[0], jax.tree.leaves(b)[0]
  )  # two models, not one saved twice
  with pytest.raises(Exception, match="holds 2 models"):
    checkpoint.load_variables(str(workdir))
  assert results["config"]["loss"]["name"] == "ncr"


@pytest.mark.slow
def test_ncr_sigterm_in_co_training_resumes_exactly(
  ncr_run, data_dir, tmp_path, monkeypatch
):
  workdir, results = ncr_run
  real_jit = co_training.jit_step
  made = []

  def counting_jit(fn, mesh, plan=None):
    jitted = real_jit(fn, mesh, plan)
    index = len(made)
    made.append(0)

    def call(*args):
      made[index] += 1
      # The third program built is the step with the unlabelled update: its
      # first call is model a's in the last epoch, with model b's to come.
      if index == 2 and made[index] == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      return jitted(*args)

    return call

  monkeypatch.setattr(co_training, "jit_step", counting_jit)
  with pytest.raises(SystemExit) as exit_info:
    train.train_and_evaluate(ncr_config(data_dir), str(tmp_path))
  assert exit_info.value.code == 0
  interrupted = checkpoint.Checkpointer(str(tmp_path))
  stopped_at = interrupted.latest.latest_step()
  interrupted.close()
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  ends = [r["step"] for r in records if r["split"] == "val"]
  assert ends[1] < stopped_at < ends[2]  # inside the last epoch
  monkeypatch.setattr(co_training, "jit_step", real_jit)
  resumed = train.train_and_evaluate(ncr_config(data_dir), str(tmp_path))
  (ra, rb), _ = _members(tmp_path)
  (ea, eb), _ = _members(workdir)
  chex.assert_trees_all_equal(ra, ea)
  chex.assert_trees_all_equal(rb, eb)
  assert resumed["test"] == results["test"]


@pytest.mark.slow
def test_evaluate_on_an_ncr_run_averages_both_models(ncr_run, data_dir, tmp_path):
  workdir, results = ncr_run
  alone = evaluate.run_evaluation(
    ncr_config(data_dir), [str(workdir)], workdir=str(tmp_path)
  )
  assert alone["ensemble_size"] == 2
  for key, value in results["test"].items():
    assert alone[key] == pytest.approx(value, abs=1e-9), key
