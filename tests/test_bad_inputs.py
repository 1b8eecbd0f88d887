"""Bad inputs through the real commands: one `error:` line, exit 2, nothing written.

One tiny synthetic dataset is generated per module; each case damages a copy
of it (or of its prepared twin) and runs `python -m srem_jax.main` or
`python -m srem_jax.evaluate` in a subprocess. Every case must fail before
JAX compiles anything, so the module stays fast.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import xla_env

from srem_jax import checkpoint, evaluate, execution, sharding
from srem_jax.data import prepare, prepared_split, synthetic
from srem_jax.errors import UserError
from srem_jax.models.sgraf import build_model
from srem_jax.train.step import init_state, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "synthetic_precomp"
SENTINEL = "keep.txt"
# The tiny model every case builds; the data below is generated to match it.
TINY = {
  "data.synthetic.enabled": False,
  "model.img_dim": 16,
  "model.embed_dim": 16,
  "model.word_dim": 8,
  "model.sim_dim": 8,
  "mesh.data": 1,
  "train.batch_size": 16,
  "eval.batch_size": 16,
  # A case that wrongly passes ends after one step instead of a whole run.
  "train.epochs": 1,
  "train.warmup_epochs": 0,
  "train.steps_per_epoch": 1,
}


def overrides(raw_dir, **changes):
  values = dict(TINY, **{"data.raw_dir": str(raw_dir)})
  values.update({k.replace("__", "."): v for k, v in changes.items()})
  return [f"--config.{k}={v}" for k, v in values.items()]


def run(module, *args, devices=1):
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=xla_env.subprocess_env(devices),
    capture_output=True,
    text=True,
    timeout=300,
  )


def snapshot(folder):
  return {
    os.path.relpath(os.path.join(root, name), folder): open(
      os.path.join(root, name), "rb"
    ).read()
    for root, _, names in os.walk(folder)
    for name in names
  }


def workdir_with_sentinel(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / SENTINEL).write_text("user file\n")
  return workdir


def assert_clean_failure(result, *fragments):
  assert result.returncode == 2, result.stdout + result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: "), lines[0]
  for fragment in fragments:
    assert str(fragment) in lines[0], lines[0]


# ---- shared data --------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A raw dataset never prepared: cases that damage raw files copy it."""
  raw = tmp_path_factory.mktemp("pristine")
  synthetic.generate(
    str(raw),
    name=NAME,
    num_train=24,
    num_dev=10,
    num_test=10,
    num_regions=4,
    feature_dim=16,
    num_concepts=12,
  )
  return raw


@pytest.fixture(scope="module")
def prepared(pristine, tmp_path_factory):
  """A copy with its prepared ArrayRecord twin, for noise and evaluate cases."""
  raw = tmp_path_factory.mktemp("prepared") / "raw"
  shutil.copytree(pristine, raw)
  vocab = os.path.join(raw, "vocab", f"{NAME}_vocab.json")
  prepare.prepare(str(raw), NAME, vocab, "", ["train", "dev", "test"], log=lambda m: 0)
  return raw


@pytest.fixture
def damaged(pristine, tmp_path):
  raw = tmp_path / "raw"
  shutil.copytree(pristine, raw)
  return raw


def run_main(raw, workdir, *extra, devices=1, **changes):
  config = os.path.join(REPO, "configs", "demo.py")
  args = [f"--config={config}", *overrides(raw, **changes), f"--workdir={workdir}"]
  return run("srem_jax.main", *args, *extra, devices=devices)


# ---- raw dataset files ----------------------------------------------------------

dev_ims = lambda raw: raw / NAME / "dev_ims.npy"  # noqa: E731
dev_caps = lambda raw: raw / NAME / "dev_caps.txt"  # noqa: E731
vocab_file = lambda raw: raw / "vocab" / f"{NAME}_vocab.json"  # noqa: E731


def drop_dataset(raw):
  shutil.rmtree(raw / NAME)
  return raw / NAME


def drop_features(raw):
  dev_ims(raw).unlink()
  return dev_ims(raw)


def rank_two_features(raw):
  features = np.load(dev_ims(raw))
  np.save(dev_ims(raw), features.reshape(features.shape[0], -1))
  return dev_ims(raw)


def integer_features(raw):
  np.save(dev_ims(raw), np.load(dev_ims(raw)).astype(np.int32))
  return dev_ims(raw)


def nan_features(raw):
  features = np.load(dev_ims(raw))
  features[5, 2, 3] = np.nan  # rows repeat 5x per image: row 5 is image 1
  np.save(dev_ims(raw), features)
  return f"{dev_ims(raw)}: row 5"


def caption_missing(raw):
  lines = dev_caps(raw).read_text().splitlines()
  dev_caps(raw).write_text("\n".join(lines[:-1]) + "\n")
  return dev_caps(raw)


def empty_caption(raw):
  lines = dev_caps(raw).read_text().splitlines()
  lines[3] = ""
  dev_caps(raw).write_text("\n".join(lines) + "\n")
  return f"{dev_caps(raw)}: line 4"


def vocab_without_unk(raw):
  data = json.loads(vocab_file(raw).read_text())
  del data["word2idx"]["<unk>"]
  vocab_file(raw).write_text(json.dumps({"word2idx": data["word2idx"]}))
  return vocab_file(raw), "no '<unk>' entry"


def malformed_vocab(raw):
  vocab_file(raw).write_text('{"word2idx": {"<pad>": 0,')
  return vocab_file(raw)


RAW_CASES = {
  "missing raw folder": drop_dataset,
  "missing dev_ims.npy": drop_features,
  "features of rank 2": rank_two_features,
  "integer features": integer_features,
  "NaN in features": nan_features,
  "captions not a multiple of images": caption_missing,
  "empty caption line": empty_caption,
  "vocab without <unk>": vocab_without_unk,
  "malformed vocab JSON": malformed_vocab,
}


@pytest.mark.parametrize("damage", RAW_CASES.values(), ids=RAW_CASES.keys())
def test_damaged_raw_dataset(damaged, tmp_path, damage):
  named = damage(damaged)
  workdir = workdir_with_sentinel(tmp_path)
  before = snapshot(workdir)
  result = run_main(damaged, workdir)
  assert_clean_failure(result, *(named if isinstance(named, tuple) else (named,)))
  assert snapshot(workdir) == before


# ---- noise files ------------------------------------------------------------------

N_CAPS, N_IMGS = 24 * 5, 24


def noise_wrong_length(path):
  np.save(path, np.arange(N_CAPS - 1))
  return "length 119"


def noise_out_of_range(path):
  t2i = np.arange(N_CAPS) // 5
  t2i[17] = N_IMGS
  np.save(path, t2i)
  return "entry 17"


def noise_fractional(path):
  t2i = (np.arange(N_CAPS) // 5).astype(np.float32)
  t2i[9] = 1.5
  np.save(path, t2i)
  return "entry 9"


def noise_not_npy(path):
  path.write_text("0 1 2 3\n")
  return "not a readable .npy"


NOISE_CASES = {
  "wrong length": noise_wrong_length,
  "index out of range": noise_out_of_range,
  "non-integral floats": noise_fractional,
  "not an npy file": noise_not_npy,
}


@pytest.mark.parametrize("write", NOISE_CASES.values(), ids=NOISE_CASES.keys())
def test_bad_noise_file(prepared, tmp_path, write):
  path = tmp_path / "noise.npy"
  fragment = write(path)
  workdir = workdir_with_sentinel(tmp_path)
  before = snapshot(workdir)
  result = run_main(prepared, workdir, noise__file=path)
  assert_clean_failure(result, path, fragment)
  assert snapshot(workdir) == before


# ---- flags and config ---------------------------------------------------------------


CONFIG_CASES = {
  "unknown key": ({"train__nope": 1}, ("train.nope", "configs/base.py")),
  "bad enum": ({"model__head": "sgraf"}, ("model.head", "sgr", "saf")),
  "out of range": ({"noise__ratio": 1.5}, ("noise.ratio",)),
  "feature width": ({"model__img_dim": 32}, ("model.img_dim=32", "16")),
}


@pytest.mark.parametrize(
  "changes, fragments", CONFIG_CASES.values(), ids=CONFIG_CASES.keys()
)
def test_bad_config_value(prepared, tmp_path, changes, fragments):
  workdir = workdir_with_sentinel(tmp_path)
  before = snapshot(workdir)
  result = run_main(prepared, workdir, **changes)
  assert_clean_failure(result, *fragments)
  assert snapshot(workdir) == before


def test_batch_not_divisible_by_devices(prepared, tmp_path):
  workdir = workdir_with_sentinel(tmp_path)
  before = snapshot(workdir)
  result = run_main(prepared, workdir, devices=2, mesh__data=-1, train__batch_size=15)
  assert_clean_failure(result, "train.batch_size=15", "2 devices")
  assert snapshot(workdir) == before


def test_config_file_missing(tmp_path):
  workdir = tmp_path / "run"
  missing = tmp_path / "configs" / "nowhere.py"
  result = run("srem_jax.main", f"--config={missing}", f"--workdir={workdir}")
  assert_clean_failure(result, missing)
  assert not workdir.exists()


# ---- evaluate -------------------------------------------------------------------------


def evaluate_args(raw, *checkpoints, **changes):
  config = os.path.join(REPO, "configs", "demo.py")
  return [
    f"--config={config}",
    *overrides(raw, **changes),
    *[f"--checkpoint={c}" for c in checkpoints],
  ]


def test_evaluate_missing_checkpoint(prepared, tmp_path):
  workdir = workdir_with_sentinel(tmp_path)
  before = snapshot(workdir)
  missing = tmp_path / "no_such_run"
  args = evaluate_args(prepared, missing)
  result = run("srem_jax.evaluate", *args, f"--workdir={workdir}")
  assert_clean_failure(result, missing, "does not exist")
  assert snapshot(workdir) == before


def tiny_config():
  sys.path.insert(0, REPO)
  from configs import demo

  config = demo.get_config()
  for key, value in TINY.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


@pytest.fixture(scope="module")
def tiny_run_workdir(prepared, tmp_path_factory):
  """A run's workdir holding a best checkpoint of the tiny model (embed_dim 16)."""
  config = tiny_config()
  split = prepared_split.load_prepared(str(prepared / "prepared"), NAME, "train")
  state = init_state(
    build_model(config.model, split.vocab_size, execution.resolve()),
    make_optimizer(config.train, steps_per_epoch=1),
    seed=0,
    num_regions=split.num_regions,
    img_dim=split.feature_dim,
    caption_len=split.max_caption_len,
    mesh=sharding.make_mesh(1),
  )
  workdir = tmp_path_factory.mktemp("tiny_run")
  ckpt = checkpoint.Checkpointer(str(workdir))
  ckpt.save_best(1, state, {"epoch": 1, "best_rsum": 0.0, "best_epoch": 1})
  ckpt.close()
  return workdir


def test_evaluate_checkpoint_of_another_model_size(prepared, tiny_run_workdir):
  before = snapshot(tiny_run_workdir)
  args = evaluate_args(prepared, tiny_run_workdir, model__embed_dim=32)
  result = run("srem_jax.evaluate", *args)
  assert_clean_failure(result, tiny_run_workdir, "parameter params/", "expects (")
  assert snapshot(tiny_run_workdir) == before


def test_shape_check_accepts_the_matching_model(prepared, tiny_run_workdir):
  # The counterpart of the case above: the checkpoint's own sizes pass, and the
  # check names a wrong leaf even when only one of them differs.
  variables, record = checkpoint.load_variables(str(tiny_run_workdir))
  assert record["best_epoch"] == 1
  split = prepared_split.load_prepared(str(prepared / "prepared"), NAME, "test")
  model = build_model(tiny_config().model, split.vocab_size, execution.resolve())
  expected = evaluate._abstract_variables(model, split, split.max_caption_len)
  checkpoint.check_shapes(variables, expected, "run")
  names = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  (first_path, first_leaf) = names[0]
  bad = jax.tree_util.tree_map_with_path(
    lambda path, leaf: leaf[..., :1] if path == first_path else leaf,
    variables["params"],
  )
  name = "/".join(k.key for k in first_path)
  with pytest.raises(UserError, match=f"parameter params/{name} has shape"):
    checkpoint.check_shapes({"params": bad}, expected, "run")
