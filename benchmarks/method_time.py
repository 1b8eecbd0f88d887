"""Training time of SREM, `ccl` and NCR on the same data, model and epochs.

Each method trains through the product's command (`python -m srem_jax.main`,
one process per method, one after another) from the same config, and the
epoch records' timings are split into training steps, per-epoch passes (NCR's
division: a loss pass with each model and two GMMs; SREM's statistics pass
and GMM with `loss.selection=epoch_gmm`) and validation. Steps are timed
without their compilation (the loops compile each step program ahead of time
and keep its compile seconds, listed apart) and averaged over every epoch;
validation over epochs 2 on, since epoch 1's validation compiles its
programs; passes as their total over the run per epoch, with a run's first
pass (which also compiles its program) counted as the median of its others. The wall time of each whole command (start-up,
compilation, final test) is beside them.

    python benchmarks/method_time.py --size=demo --out=/tmp/method_time
    python benchmarks/method_time.py --size=paper --out=/tmp/method_time_paper

`--size=demo` is configs/demo.py (its epochs unless --epochs); `--size=paper`
puts the paper's SGRAF dimensions (2048-d regions, 36 per image, 1024-d
embeddings, 300-d words, 256-d similarity nodes) on a synthetic set of
`--images` training images (5 captions each; 64 at batch 32 is 10 steps an
epoch) for 4 epochs, one of them warm-up, so every pass over the data stays whole and the passes keep their
share of an epoch; `--steps` caps the training passes instead (then the
statistics passes, which stay whole, weigh more than in a real epoch).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = {
  "srem": {"loss.name": "srem"},
  "srem (epoch_gmm)": {"loss.name": "srem", "loss.selection": "epoch_gmm"},
  "ccl": {"loss.name": "ccl"},
  "ncr": {"loss.name": "ncr"},
}


def size_overrides(args) -> dict:
  o = {"data.raw_dir": os.path.join(args.out, "data"), "progress.enabled": False}
  if args.size == "paper":
    o.update(
      {
        "data.synthetic.num_train": args.images,
        "data.synthetic.num_dev": 50,
        "data.synthetic.num_test": 50,
        "data.synthetic.num_regions": 36,
        "data.synthetic.feature_dim": 2048,
        "model.img_dim": 2048,
        "model.embed_dim": 1024,
        "model.word_dim": 300,
        "model.sim_dim": 256,
        "train.batch_size": args.batch,
        "train.log_every_steps": 1000,
      }
    )
  if args.steps:
    o["train.steps_per_epoch"] = args.steps
  if args.epochs:
    o["train.epochs"] = args.epochs
    o["train.warmup_epochs"] = args.warmup
    o["train.lr_decay_epochs"] = args.warmup
  return o


def _train(workdir, overrides, env) -> float:
  """Wall seconds of one `srem_jax.main` command, its output in <workdir>.log."""
  command = [
    sys.executable,
    "-m",
    "srem_jax.main",
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in overrides.items()),
  ]
  start = time.perf_counter()
  with open(f"{workdir}.log", "w") as out:
    subprocess.run(
      command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=True
    )
  return time.perf_counter() - start


def run_method(name, overrides, args) -> dict:
  workdir = os.path.join(args.out, _slug(name))
  wall = _train(workdir, {**overrides, **METHODS[name]}, dict(os.environ))
  return {**summarise(name, workdir), "wall_s": wall}


def _slug(name: str) -> str:
  return name.replace(" ", "_").replace("(", "").replace(")", "")


def summarise(name: str, workdir: str) -> dict:
  """Per-epoch means of one finished run's timings (see the module doc)."""
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = {r["epoch"]: r for r in records if r["split"] == "train"}
  val = {r["epoch"]: r for r in records if r["split"] == "val"}
  test = next(r for r in records if r["split"] == "test")
  epochs = sorted(train)
  later = epochs[1:] or epochs
  # A run's first statistics pass also compiles its program: it counts as
  # the median of the run's other passes (the same work, compiled).
  passes = [
    train[e]["time_passes_s"] for e in epochs if train[e]["time_passes_s"] > 0.05
  ]
  if len(passes) > 1:
    passes[0] = float(np.median(passes[1:]))
  return {
    "method": name,
    "train_s": float(np.mean([train[e]["time_train_s"] for e in epochs])),
    "passes_s": sum(passes) / len(epochs),
    "val_s": float(np.mean([val[e]["time_val_s"] for e in later])),
    "compile_s": sum(train[e].get("time_compile_s", 0.0) for e in epochs),
    "epochs": len(train),
    "test_rsum": test["rsum"],
  }


def table(rows) -> str:
  ncr = next(r for r in rows if r["method"] == "ncr")
  ncr_epoch = ncr["train_s"] + ncr["passes_s"] + ncr["val_s"]
  lines = [
    "| method | steps s/epoch | passes s/epoch | validation s/epoch | epoch s "
    "| / NCR | step compiles s | whole command s | / NCR | test rSum |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    epoch = r["train_s"] + r["passes_s"] + r["val_s"]
    lines.append(
      f"| {r['method']} | {r['train_s']:.2f} | {r['passes_s']:.2f} | {r['val_s']:.2f} "
      f"| {epoch:.2f} | {epoch / ncr_epoch:.2f} | {r['compile_s']:.1f} "
      f"| {r['wall_s']:.1f} | {r['wall_s'] / ncr['wall_s']:.2f} | {r['test_rsum']:.1f} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("demo", "paper"), default="demo")
  parser.add_argument("--out", required=True, help="Folder for data, runs and logs.")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--epochs", type=int, default=0, help="0 = the config's.")
  parser.add_argument("--warmup", type=int, default=1, help="With --epochs.")
  parser.add_argument(
    "--steps", type=int, default=0, help="Cap on steps per pass (0 = all)."
  )
  parser.add_argument("--batch", type=int, default=32, help="paper: batch size.")
  parser.add_argument("--images", type=int, default=64, help="paper: train images.")
  parser.add_argument(
    "--parse_only", action="store_true", help="Re-read the runs in --out."
  )
  args = parser.parse_args()
  if args.size == "paper" and not args.epochs:
    args.epochs = 4
  os.makedirs(args.out, exist_ok=True)
  names = args.methods.split(",")
  unknown = sorted(set(names) - set(METHODS))
  if unknown or "ncr" not in names:
    parser.error(
      f"--methods: some of {', '.join(METHODS)}, ncr included; got {unknown}"
    )
  overrides = size_overrides(args)
  rows = []
  for name in names:
    if args.parse_only:  # the runs of an earlier invocation, read again
      row = json.load(open(os.path.join(args.out, f"{_slug(name)}.json")))
      rows.append({**row, **summarise(name, os.path.join(args.out, _slug(name)))})
      continue
    print(f"training {name} ...", flush=True)
    rows.append(run_method(name, overrides, args))
    json.dump(rows[-1], open(os.path.join(args.out, f"{_slug(name)}.json"), "w"))
    print(json.dumps(rows[-1]), flush=True)
  print(f"\nsize {args.size}, overrides {json.dumps(overrides)}\n")
  print(table(rows))


if __name__ == "__main__":
  main()
