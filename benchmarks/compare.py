"""Ours against the PyTorch reference, on the same machine, in one run.

Runs `python benchmarks/bench.py` (float32 and bfloat16) and
`benchmarks/torch_reference.py` for the training step and evaluation,
alternating the programs over `--rounds` so that a machine whose speed drifts
shifts both sides alike, then prints one table row per measurement and the
ratios of the medians. Every run is its own process; the JSON lines of all of
them go to `--out`. With `--caption_lengths` (a histogram file) every
measurement is made twice, at the fixed length and with lengths drawn from
the file (both programs draw the same ones), and both ratios are printed.
Our evaluation is the product's (`bench eval --resident`: device-resident
embeddings, `srem_jax/eval/retrieval.py`); `--plain` adds a float32 run of the head
without length groups (`--length_group=0`) beside the default one.

    python benchmarks/compare.py --rounds=2 --steps=3 --out=compare.jsonl
    python benchmarks/compare.py --rounds=1 --steps=2 \
        --caption_lengths=../shared/data/f30k_caption_lengths.json
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = [sys.executable, str(Path(__file__).with_name("bench.py"))]
REFERENCE = [sys.executable, str(ROOT / "benchmarks" / "torch_reference.py")]
TARGETS = {  # the aimed-for ratios to the reference
  ("train_step", "float32"): 2.0,
  ("eval", "float32"): 1.5,
  ("train_step", "bfloat16"): 3.0,
  ("eval", "bfloat16"): 3.0,
}


def _run(command: list[str]) -> dict:
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  if done.returncode:
    sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--benches", default="train_step,eval")
  parser.add_argument("--out", default="compare.jsonl")
  parser.add_argument(
    "--caption_lengths",
    help="Histogram JSON: also measure with caption lengths drawn from it.",
  )
  parser.add_argument(
    "--dtypes", default="float32,bfloat16", help="Our dtypes to measure."
  )
  parser.add_argument(
    "--plain",
    action="store_true",
    help="Also measure float32 without length groups (--length_group=0).",
  )
  args = parser.parse_args(argv)
  lengths = [("fixed", [])]
  if args.caption_lengths:
    path = str(Path(args.caption_lengths).resolve())
    lengths.append(("real", [f"--caption_lengths={path}"]))
  dtypes = args.dtypes.split(",")
  variants = [(dtype, [f"--dtype={dtype}"]) for dtype in dtypes]
  if args.plain:
    variants.append(("plain", ["--dtype=float32", "--length_group=0"]))
  rates: dict[tuple, list[float]] = {}
  with open(args.out, "a") as out:
    for round_ in range(args.rounds):
      for bench in args.benches.split(","):
        for label, extra in lengths:
          resident = ["--resident"] if bench == "eval" else []
          runs = [("reference", REFERENCE + [bench])] + [
            (name, OURS + [bench, *flags, *resident]) for name, flags in variants
          ]
          for name, command in runs[:: 1 if round_ % 2 == 0 else -1]:
            result = _run(command + [f"--steps={args.steps}"] + extra)
            result["compare"] = {"round": round_, "name": name, "lengths": label}
            out.write(json.dumps(result) + "\n")
            out.flush()
            rates.setdefault((bench, label, name), []).append(result["pairs_per_s"])
            load = result.get("load_average", [float("nan")])[0]
            print(
              f"round {round_} {bench:10s} {label:5s} {name:9s} "
              f"{result['pairs_per_s']:9,.0f} pairs/s  (load {load:.1f})",
              flush=True,
            )
  print("\nmedians and ratios to the reference:")
  for bench in args.benches.split(","):
    for label, _ in lengths:
      reference = statistics.median(rates[(bench, label, "reference")])
      print(f"{bench:10s} {label:5s} reference {reference:9,.0f} pairs/s")
      for name, _ in variants:
        ours = statistics.median(rates[(bench, label, name)])
        target = TARGETS[(bench, "float32" if name == "plain" else name)]
        print(
          f"{bench:10s} {label:5s} {name:9s} {ours:9,.0f} pairs/s  "
          f"{ours / reference:.2f}x (target {target:.1f}x)"
        )


if __name__ == "__main__":
  main()
