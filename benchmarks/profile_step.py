"""Where a training step's time goes, by part of the network, from XLA's own trace.

Runs `bench_train_step` of benchmarks/bench.py once to compile, once more under
`jax.profiler`, then adds up the duration of every executed XLA operation by
the part of the model its HLO metadata names (the local-node layer, the SGR
layers, the context product, the text encoder, ...) and prints the parts
with their share, then the slowest single operations. Durations are those
of the operations themselves (profiling adds a little), per step.

    python benchmarks/profile_step.py --dtype=float32 --top=15
"""

import argparse
import collections
import glob
import re
import tempfile

import bench
import jax
from jax._src.lib import _profile_data

# Part of the model -> pattern in an operation's HLO op_name (first match wins).
PARTS = [
  ("local-node layer (sim_tranloc_w)", r"sim_tranloc_w"),
  ("SGR layers", r"SGR_module"),
  ("context product and its gradients", r"nrm,nme|nme,nre"),
  ("attention logits", r"nre,cle"),
  ("elementwise work on pairs (norms, softmax, squares)", r"/pairs/"),
  ("scan buffers (saved activations)", r"dynamic_update|dynamic_slice"),
  ("text encoder (GRU)", r"txt_enc|dmh,dhg"),
  ("image encoder and VisualSA", r"img_enc|v_global_w"),
]


def _op_names(hlo_text: str) -> dict[str, str]:
  names = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
    if match:
      names.setdefault(match.group(1), match.group(2))
  return names


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args()
  bench.bench_train_step(steps=1, dtype=args.dtype)  # compile, fill caches
  trace_dir = tempfile.mkdtemp(prefix="profile_step_")
  jax.profiler.start_trace(trace_dir)
  result = bench.bench_train_step(steps=1, dtype=args.dtype, hlo=True)
  jax.profiler.stop_trace()
  runs = 2  # the warm-up and the timed step
  names = _op_names(result["hlo"])
  profile = _profile_data.ProfileData.from_file(
    glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
  )
  parts, ops = collections.Counter(), collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:  # the threads that run XLA's operations
        continue
      for event in line.events:
        if event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
          continue
        op_name = names.get(event.name, "")
        part = next((p for p, pat in PARTS if re.search(pat, op_name)), "other")
        parts[part] += event.duration_ns / runs / 1e6
        where = "/".join(op_name.split("/")[-2:])
        ops[(event.name, where)] += event.duration_ns / runs / 1e6
  total = sum(parts.values())
  print(f"train step {args.dtype}: {result['pairs_per_s']:,.0f} pairs/s unprofiled")
  print(f"operation time per step: {total:,.0f} ms")
  for part, ms in parts.most_common():
    print(f"{ms:8,.0f} ms  {100 * ms / total:5.1f}%  {part}")
  print(f"\nslowest {args.top} operations (ms per step):")
  for (op, where), ms in ops.most_common(args.top):
    print(f"{ms:8,.0f}  {op}  ({where})")


if __name__ == "__main__":
  main()
