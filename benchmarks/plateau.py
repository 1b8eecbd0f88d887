"""When a run trained from scratch leaves its initial loss plateau.

With every score about equal, the hardest-negative triplet costs each anchor
about 2·margin (one hinge per direction), so a batch of K pairs sums to about
2·K·margin. This script trains the demo model (configs/demo.py) with
`python -m srem_jax.main` for each dataset size × learning rate (and a few
extra runs), at a constant learning rate, reads each run's log and
metrics.jsonl, and prints a table of the step at which it left the plateau.

Definition (`plateau_exit`). The log prints, every `log_every` steps, the mean
since the epoch began of the per-step loss (the batch's sum over anchors for
`triplet_hardest`); differencing consecutive lines gives the mean over each
window of steps, divided by K the loss per anchor. A run has left the plateau
at logged step s when (a) from s on every window's loss per anchor is below
`loss_fraction` · 2 · margin and (b) every validation rSum from the first
epoch end at or after s on is above the untrained model's by `rsum_margin`.
For `ccl`, whose loss has another scale, only (b) applies. The untrained
rSum is measured per dataset size: one step at a learning rate of 1e-12, then
the validation pass.

    taskset -c 1 python benchmarks/plateau.py --out=studies/plateau \
      --sizes=600,2000 --epochs=20,8 --lrs=2e-3,5e-4,2e-4 --noise=0.4 \
      --extra=triplet_hardest:600:2e-3:0.0:20,ccl:600:2e-3:0.4:15

A run whose workdir already holds results.json is parsed, not rerun; one
without resumes from its latest checkpoint, so a run copied into another
--out without its results.json continues to a larger --epochs.
"""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNTRAINED_LR = 1e-12

_STEP_LINE = re.compile(
  r"^epoch (\d+)/\d+(?: \(warm-up\))? (\d+)/\d+ steps.*\| loss (\S+)"
)
_SPE_LINE = re.compile(r"(\d+) steps/epoch")


@dataclasses.dataclass(frozen=True)
class Run:
  loss: str
  size: int
  lr: float
  noise: float
  epochs: int
  seed: int = 0

  @property
  def name(self) -> str:
    seed = f"_s{self.seed}" if self.seed else ""
    return f"{self.loss}_n{self.size}_lr{self.lr:g}_noise{self.noise:g}{seed}"


def window_losses(points, steps_per_epoch):
  """Mean loss of each window between logged steps.

  `points` are (step, running mean since the epoch began) in step order, as
  the training log prints them. Returns (step, mean over the steps since the
  previous logged step) for each point.
  """
  out, prev_step, prev_mean = [], None, 0.0
  for step, mean in points:
    start = (step - 1) // steps_per_epoch * steps_per_epoch
    if prev_step is None or prev_step <= start:  # first window of an epoch
      prev_step, prev_mean = start, 0.0
    n_prev, n = prev_step - start, step - start
    out.append((step, (mean * n - prev_mean * n_prev) / (n - n_prev)))
    prev_step, prev_mean = step, mean
  return out


def plateau_exit(windows, val, threshold, min_rsum):
  """First logged step from which the run stays off the plateau, or None.

  `windows`: (step, loss) pairs; `threshold`: the loss every window from the
  step on must stay below (None: no loss condition). `val`: (step, rSum) at
  epoch ends; every one at or after the step must exceed `min_rsum`.
  """
  candidates = [s for s, _ in windows] or [s for s, _ in val]
  for s in candidates:
    loss_ok = threshold is None or all(v < threshold for t, v in windows if t >= s)
    later = [r for t, r in val if t >= s]
    if loss_ok and later and all(r > min_rsum for r in later):
      return s
  return None


def parse_log(text):
  """(steps per epoch, [(step, running epoch mean loss)]) from a training log."""
  spe = int(_SPE_LINE.search(text).group(1))
  points = []
  for line in text.splitlines():
    m = _STEP_LINE.match(line)
    if m:
      points.append((int(m.group(2)), float(m.group(3))))
  return spe, points


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def train(run: Run, out: str, log_every: int, steps_cap: int = 0):
  workdir = os.path.join(out, run.name)
  if os.path.exists(os.path.join(workdir, "results.json")):
    return workdir
  args = [
    sys.executable,
    "-m",
    "srem_jax.main",
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    f"--config.loss.name={run.loss}",
    f"--config.data.synthetic.num_train={run.size}",
    f"--config.data.raw_dir=data/plateau_{run.size}",
    f"--config.train.lr={run.lr}",
    f"--config.noise.ratio={run.noise}",
    f"--config.train.epochs={run.epochs}",
    # A constant rate: no decay within the run, and no SREM phase switch.
    f"--config.train.lr_decay_epochs={run.epochs}",
    "--config.train.warmup_epochs=0",
    f"--config.train.log_every_steps={log_every}",
    f"--config.train.seed={run.seed}",
    f"--config.train.steps_per_epoch={steps_cap}",
  ]
  print(" ".join(args[1:]), flush=True)
  env = dict(os.environ, PYTHONPATH=REPO)
  # Appended to: a run resumed from its workdir's checkpoint keeps one log.
  with open(os.path.join(out, run.name + ".log"), "a") as log:
    subprocess.run(
      args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True
    )
  return workdir


def untrained_run(size: int, noise: float, seed: int) -> Run:
  """One step at a rate of 1e-12: the initial model, validated."""
  return Run("triplet_hardest", size, UNTRAINED_LR, noise, 1, seed)


def first_val_rsum(workdir: str) -> float:
  return [r["rsum"] for r in read_metrics(workdir) if r["split"] == "val"][0]


def summarize(run: Run, out: str, batch: int, margin: float, args, untrained: float):
  workdir = os.path.join(out, run.name)
  with open(os.path.join(out, run.name + ".log")) as f:
    spe, points = parse_log(f.read())
  records = read_metrics(workdir)
  val = [(r["step"], r["rsum"]) for r in records if r["split"] == "val"]
  # The triplet's per-step loss sums its anchors; CMBCL's already averages them.
  per = batch if run.loss == "triplet_hardest" else 1
  windows = [(s, v / per) for s, v in window_losses(points, spe)]
  plateau = 2 * margin
  threshold = args.loss_fraction * plateau if run.loss == "triplet_hardest" else None
  exit_step = plateau_exit(windows, val, threshold, untrained + args.rsum_margin)
  at_exit = next((r for t, r in val if exit_step is not None and t >= exit_step), None)
  return {
    "run": dataclasses.asdict(run),
    "steps_per_epoch": spe,
    "untrained_rsum": untrained,
    "exit_step": exit_step,
    "exit_epoch": None if exit_step is None else exit_step / spe,
    "rsum_at_exit": at_exit,
    "rsum_end": val[-1][1],
    "rsum_best": max(r for _, r in val),
    "val_rsum": val,
    "loss_per_anchor": windows,
    "train_epoch_loss": [r["loss"] for r in records if r["split"] == "train"],
  }


def table(rows) -> str:
  head = (
    "| loss | size | lr | noise | seed | steps/epoch | epochs | exit step "
    "| epochs done at exit | val rSum at exit | val rSum end (best) "
    "| last loss per anchor | untrained rSum |"
  )
  lines = [head, "|" + "---|" * 13]
  for r in rows:
    run, e = r["run"], r["exit_step"]
    exit_text = "not left" if e is None else f"{e}"
    ep = "—" if e is None else f"{r['exit_epoch']:.1f}"
    at = "—" if r["rsum_at_exit"] is None else f"{r['rsum_at_exit']:.1f}"
    last = r["loss_per_anchor"][-1][1]
    lines.append(
      f"| {run['loss']} | {run['size']} | {run['lr']:g} | {run['noise']:g} | {run['seed']} "
      f"| {r['steps_per_epoch']} | {run['epochs']} | {exit_text} | {ep} | {at} "
      f"| {r['rsum_end']:.1f} ({r['rsum_best']:.1f}) | {last:.3f} "
      f"| {r['untrained_rsum']:.1f} |"
    )
  return "\n".join(lines)


def _floats(text):
  return [float(x) for x in text.split(",") if x]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="studies/plateau")
  p.add_argument("--sizes", default="600,2000", help="training images per run")
  p.add_argument("--epochs", default="20,8", help="one per size, or one for all")
  p.add_argument("--lrs", default="2e-3,5e-4,2e-4")
  p.add_argument("--noise", type=float, default=0.4)
  p.add_argument("--loss", default="triplet_hardest")
  p.add_argument(
    "--extra",
    default="triplet_hardest:600:2e-3:0.0:20,ccl:600:2e-3:0.4:15",
    help="more runs, each loss:size:lr:noise:epochs",
  )
  p.add_argument("--log_every", type=int, default=10)
  p.add_argument("--seeds", default="0", help="each run once per seed")
  p.add_argument("--loss_fraction", type=float, default=0.9)
  p.add_argument("--rsum_margin", type=float, default=30.0)
  p.add_argument("--parse_only", action="store_true", help="only read finished runs")
  args = p.parse_args(argv)

  sys.path.insert(0, REPO)
  from configs import demo

  config = demo.get_config()
  batch, margin = config.train.batch_size, config.loss.margin
  sizes = [int(s) for s in _floats(args.sizes)]
  epochs = [int(e) for e in _floats(args.epochs)]
  epochs = epochs * len(sizes) if len(epochs) == 1 else epochs
  if len(epochs) != len(sizes):
    p.error("--epochs takes one value, or one per size")
  runs = [
    Run(args.loss, n, lr, args.noise, ep)
    for n, ep in zip(sizes, epochs)
    for lr in _floats(args.lrs)
  ]
  for spec in filter(None, args.extra.split(",")):
    loss, n, lr, noise, ep = spec.split(":")
    runs.append(Run(loss, int(n), float(lr), float(noise), int(ep)))
  seeds = [int(s) for s in _floats(args.seeds)]
  runs = [dataclasses.replace(r, seed=s) for s in seeds for r in runs]
  os.makedirs(args.out, exist_ok=True)

  untrained, rows = {}, []
  for run in runs:
    finished = os.path.join(args.out, run.name, "results.json")
    if args.parse_only and not os.path.exists(finished):
      continue
    # The untrained model depends on the size (its data) and the seed (its
    # initial parameters), not on the noise: validation pairs are clean.
    key = (run.size, run.seed)
    if key not in untrained:
      base = untrained_run(run.size, args.noise, run.seed)
      if not args.parse_only:
        train(base, args.out, log_every=1, steps_cap=1)
      untrained[key] = first_val_rsum(os.path.join(args.out, base.name))
    if not args.parse_only:
      train(run, args.out, args.log_every)
    if os.path.exists(finished):
      rows.append(summarize(run, args.out, batch, margin, args, untrained[key]))
  with open(os.path.join(args.out, "plateau.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(
    f"plateau: loss/K = 2*margin = {2 * margin:g}; left when every later window "
    f"< {args.loss_fraction:g} x that (triplet only) and every later val rSum > "
    f"untrained + {args.rsum_margin:g}"
  )
  print(table(rows))


if __name__ == "__main__":
  main()
