"""Validation and selection-pass time per epoch, on the demo and at paper dims.

Builds the run's data as training does (`dataset.open_data`), a freshly
initialised model, and times (median of `--repeats` after one warm-up):
validation on the demo's val split, the per-epoch selection statistics
(with and without `data.features_on_device`), and validation of a synthetic
200-image (1,000-caption) split at the paper's dimensions. One JSON line.

    python benchmarks/eval_timing.py [--repeats=3] [--paper=1]
"""

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())

import jax  # noqa: E402

from configs import demo  # noqa: E402
from srem_jax import execution, sharding  # noqa: E402
from srem_jax.data import dataset, resident  # noqa: E402
from srem_jax.models.sgraf import build_model  # noqa: E402
from srem_jax.train import step  # noqa: E402

try:  # the evaluation/selection modules, or the one module they came from
  from srem_jax.eval import evaluator
  from srem_jax.train import selection

  def validate(model, variables, split, config, mesh, caption_len, n):
    plan = execution.resolve(config.execution)
    return evaluator.for_config(
      config, model, split, mesh, plan, caption_len=caption_len, num_images=n
    ).run(variables)

  def statistics_pass(model, variables, data, config, mesh, features):
    return selection.pair_statistics(
      model, variables, data, config, mesh, tau=0.05, temp=1.0, features=features
    )
except ImportError:
  from srem_jax import evaluate

  def validate(model, variables, split, config, mesh, caption_len, n):
    return evaluate.evaluate_split(
      model, variables, split, config, mesh, caption_len, n
    )

  def statistics_pass(model, variables, data, config, mesh, features):
    return evaluate.train_pair_statistics(
      model, variables, data, config, mesh, tau=0.05, temp=1.0
    )


def _time(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def _setup(config, workdir):
  mesh = sharding.make_mesh(config.mesh.data)
  data = dataset.open_data(config, workdir, log=lambda _: None)
  plan = execution.resolve(config.execution)
  model = build_model(config.model, data.vocab_size, plan)
  tx = step.make_optimizer(config.train, 10)
  state = step.init_state(
    model, tx, seed=0, num_regions=data.train.num_regions,
    img_dim=data.train.feature_dim, caption_len=data.caption_len, mesh=mesh,
  )  # fmt: skip
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return mesh, data, model, variables


def main():
  repeats = int(dict(a.lstrip("-").split("=") for a in sys.argv[1:]).get("repeats", 3))
  paper = dict(a.lstrip("-").split("=") for a in sys.argv[1:]).get("paper", "1") == "1"
  config = demo.get_config()
  config.progress.enabled = False
  out = {}
  with tempfile.TemporaryDirectory() as workdir:
    mesh, data, model, variables = _setup(config, workdir)
    out["demo_val_s"] = _time(
      lambda: validate(
        model, variables, data.val, config, mesh, data.caption_len, data.val_images
      ),
      repeats,
    )
    out["demo_selection_s"] = _time(
      lambda: statistics_pass(model, variables, data, config, mesh, None), repeats
    )
    features = resident.resident_features(
      data.train, mesh, config.model.dtype, lambda _: None
    )
    out["demo_selection_resident_s"] = _time(
      lambda: statistics_pass(model, variables, data, config, mesh, features), repeats
    )
  if paper:
    with tempfile.TemporaryDirectory() as root:
      config.data.raw_dir = os.path.join(root, "raw")
      config.data.prepared_dir = os.path.join(root, "prep")
      s = config.data.synthetic
      s.num_train, s.num_dev, s.num_test = 40, 200, 1
      s.num_regions, s.feature_dim = 36, 2048
      m = config.model
      m.img_dim, m.embed_dim, m.word_dim, m.sim_dim = 2048, 1024, 300, 256
      mesh, data, model, variables = _setup(config, os.path.join(root, "w"))
      out["paper_val_200x1000_s"] = _time(
        lambda: validate(
          model, variables, data.val, config, mesh, data.caption_len, 200
        ),
        repeats,
      )
  out["devices"] = jax.device_count()
  print(json.dumps(out))


if __name__ == "__main__":
  main()
