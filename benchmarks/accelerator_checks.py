"""What the GPU and TPU programs hold, checked on a machine without either.

Owns the programs a run compiles (`train_step_program`, `encoders_program`,
`scorer_program`, each a jitted function plus abstract arguments at the
execution preset's sizes) and the checks on them:
- `exported_text`: the StableHLO `jax.export` lowers for `cuda` or `tpu`
  (a CPU-only jaxlib can do this), and `dot_summary`: the precision of every
  `dot_general` in it and any `optimization_barrier` left (a CPU-only
  construct);
- `scan_collectives`: the collectives inside the loop bodies of a program
  compiled for several (host) devices;
- `memory_needs`: what the compiled program allocates, from XLA's memory
  analysis of the CPU compile of the same program (the GPU/TPU compilers
  assign buffers differently; the figure is a guide, not a promise).

`python benchmarks/bench.py checks` prints all of them at paper dimensions.

    fn, args = train_step_program("sgr", "float32", execution.resolve({"preset": "gpu"}))
    summary = dot_summary(exported_text(fn, args, "cuda"))
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from srem_jax import execution, sharding
from srem_jax.models.dims import PAPER_DIMS, make_model
from srem_jax.models.sgraf import SGRAF, CaptionEmbedding, ImageEmbedding
from srem_jax.train import step

# The padded caption length of the F30K test split (its longest caption).
F30K_CAPTION_LEN = 77
DEVICE_MEMORY = {"H200": 141e9, "TPU v5e": 16e9}
COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "collective-permute",
  "all-to-all",
)


def plan_for(preset: str, precision: str = "highest") -> execution.Execution:
  return execution.resolve({"preset": preset, "matmul_precision": precision})


def _model(head, dtype, plan, dims) -> SGRAF:
  return make_model(head, dtype, dims, **plan.model_kwargs())


def train_step_program(
  head, dtype, plan, *, batch=128, caption_len=40, dims=PAPER_DIMS, mesh=None
):
  """The SREM update step (clean phase) and abstract (state, batch)."""
  mesh = mesh or Mesh(np.array(jax.devices()[:1]), (sharding.DATA_AXIS,))
  from configs import base  # the defaults every run starts from

  config = base.get_config()
  model = _model(head, dtype, plan, dims)
  tx = step.make_optimizer(config.train, steps_per_epoch=1000)
  state = jax.eval_shape(
    lambda: step.init_state(
      model,
      tx,
      seed=0,
      num_regions=dims["num_regions"],
      img_dim=dims["img_dim"],
      caption_len=caption_len,
      mesh=mesh,
    )
  )
  rows = sharding.data_sharding(mesh)
  spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rows)
  batch_spec = {
    "images": spec((batch, dims["num_regions"], dims["img_dim"]), jnp.float32),
    "tokens": spec((batch, caption_len), jnp.int32),
    "lengths": spec((batch,), jnp.int32),
    "truly_clean": spec((batch,), jnp.bool_),
  }
  fn = step.make_train_step(
    model,
    tx,
    step.loss_options(config.loss),
    mesh,
    warmup=False,
    external_selection=False,
  )
  return fn, (state, batch_spec)


def _variables_spec(model, dims, caption_len):
  images = jnp.zeros((2, dims["num_regions"], dims["img_dim"]), jnp.float32)
  tokens = jnp.ones((2, caption_len), jnp.int32)
  lengths = jnp.full((2,), caption_len, jnp.int32)
  return jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), images, tokens, lengths, train=False)
  )


def encoders_program(dtype, plan, *, batch=256, caption_len=40, dims=PAPER_DIMS):
  """Both encoders in evaluation mode on one batch of images and captions."""
  model = _model("sgr", dtype, plan, dims)

  def encode(variables, images, tokens, lengths):
    img = model.apply(variables, images, train=False, method=SGRAF.encode_images)
    cap = model.apply(
      variables, tokens, lengths, train=False, method=SGRAF.encode_captions
    )
    return img, cap

  args = (
    _variables_spec(model, dims, caption_len),
    jax.ShapeDtypeStruct((batch, dims["num_regions"], dims["img_dim"]), jnp.float32),
    jax.ShapeDtypeStruct((batch, caption_len), jnp.int32),
    jax.ShapeDtypeStruct((batch,), jnp.int32),
  )
  return jax.jit(encode), args


def scorer_program(head, dtype, plan, *, caption_len=40, dims=PAPER_DIMS):
  """The all-pairs scorer on one evaluation tile (plan.img_tile x plan.cap_tile)."""
  model = _model(head, dtype, plan, dims)
  e, r = dims["embed_dim"], dims["num_regions"]
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  img = ImageEmbedding(f32(plan.img_tile, r, e), f32(plan.img_tile, e))
  cap = CaptionEmbedding(
    f32(plan.cap_tile, caption_len, e),
    f32(plan.cap_tile, e),
    jax.ShapeDtypeStruct((plan.cap_tile, caption_len), jnp.bool_),
  )
  score = jax.jit(lambda v, i, c: model.apply(v, i, c, train=False, method=SGRAF.score))
  return score, (_variables_spec(model, dims, caption_len), img, cap)


def exported_text(fn, args, platform: str) -> str:
  """The StableHLO module of `fn(*args)` lowered for `platform` (cuda, tpu)."""
  return jax.export.export(fn, platforms=[platform])(*args).mlir_module()


_DOT = re.compile(r"stablehlo\.dot_general[^\n]*")
_PRECISION = re.compile(r"precision = \[(\w+), (\w+)\]")


def dot_summary(text: str) -> dict:
  """Every dot_general's precision (pairs such as "HIGHEST/HIGHEST"; "none"
  where the op carries no precision, i.e. the platform's default) and the
  number of optimisation barriers."""
  precisions = collections.Counter()
  for dot in _DOT.findall(text):
    found = _PRECISION.search(dot)
    precisions["/".join(found.groups()) if found else "none"] += 1
  return {
    "dots": sum(precisions.values()),
    "precisions": dict(precisions),
    "optimization_barriers": text.count("stablehlo.optimization_barrier"),
  }


def _computations(hlo: str) -> dict[str, list[str]]:
  bodies, name = {}, None
  for line in hlo.splitlines():
    header = not line.startswith(" ") and re.match(
      r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line
    )
    if header:
      name = header.group(1)
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)
  return bodies


def scan_collectives(hlo: str) -> list[dict]:
  """For each while loop of a compiled HLO module: its collectives (counted by
  kind, including computations the body calls) and the ops they come from."""
  bodies = _computations(hlo)
  found = []
  for loop, body in re.findall(
    r"while\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)", hlo
  ):
    seen, todo = set(), [body]
    while todo:
      name = todo.pop()
      if name in seen:
        continue
      seen.add(name)
      for line in bodies.get(name, []):
        todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
    counts, sources = collections.Counter(), []
    for name in seen:
      for line in bodies.get(name, []):
        for kind in COLLECTIVES:
          if re.search(rf"\s{kind}(-start)?\(", line):
            counts[kind] += 1
            op = re.search(r'op_name="([^"]*)"', line)
            shape = re.search(r"= (\(?[\w\[\],{}\s/*=.]*?\)?) " + kind, line)
            sources.append(
              {
                "kind": kind,
                "shape": shape.group(1) if shape else "",
                "op_name": op.group(1) if op else "",
              }
            )
    found.append({"body": body, "collectives": dict(counts), "sources": sources})
  return found


def memory_needs(fn, args) -> dict:
  """Bytes the compiled (CPU) program allocates: arguments, outputs, temporaries."""
  analysis = fn.lower(*args).compile().memory_analysis()
  fields = {
    "arguments": analysis.argument_size_in_bytes,
    "outputs": analysis.output_size_in_bytes,
    "temporaries": analysis.temp_size_in_bytes,
    "aliased": analysis.alias_size_in_bytes,
  }
  fields["peak_estimate"] = (
    fields["arguments"] + fields["outputs"] + fields["temporaries"] - fields["aliased"]
  )
  return fields


# ---- the report `python benchmarks/bench.py checks` prints --------------------

TARGETS = {"gpu": ("cuda", "H200"), "tpu": ("tpu", "TPU v5e")}


def _explain(source: dict) -> str:
  op = source["op_name"]
  if "SAF_module/psum" in op:
    return (
      "SAF's train-mode BatchNorm: a caption's statistics span the images of "
      "every device, so each scan step sums them (needed by the math)"
    )
  return "not explained: a collective the math does not need"


def report(log=print, *, dims=PAPER_DIMS, batch=128, caption_len=40) -> dict:
  """Exports for cuda/tpu, the sharded step's loop collectives, memory needs."""
  out = {"exports": [], "collectives": [], "memory": []}
  for preset, (platform, _) in TARGETS.items():
    for head in ("sgr", "saf"):
      for dtype in ("float32", "bfloat16"):
        fn, args = train_step_program(
          head, dtype, plan_for(preset), batch=batch, caption_len=caption_len, dims=dims
        )
        summary = dot_summary(exported_text(fn, args, platform))
        out["exports"].append({"program": f"train_step {head} {dtype}", "preset": preset,
                               "platform": platform, **summary})  # fmt: skip
    for name, (fn, args) in (
      ("encoders float32", encoders_program("float32", plan_for(preset), dims=dims)),
      (
        "scorer sgr float32",
        scorer_program("sgr", "float32", plan_for(preset), dims=dims),
      ),
    ):
      summary = dot_summary(exported_text(fn, args, platform))
      out["exports"].append({"program": name, "preset": preset,
                             "platform": platform, **summary})  # fmt: skip
  log("exported StableHLO (execution.matmul_precision=highest):")
  for row in out["exports"]:
    ok = (
      set(row["precisions"]) == {"HIGHEST/HIGHEST"} and not row["optimization_barriers"]
    )
    log(
      f"  {row['platform']:4s} {row['program']:26s} {row['dots']:4d} dots "
      f"{row['precisions']} barriers {row['optimization_barriers']}  "
      f"{'ok' if ok else 'NOT OK'}"
    )

  devices = jax.devices()
  mesh = Mesh(np.array(devices), (sharding.DATA_AXIS,))
  fn, args = train_step_program(
    "sgr", "float32", plan_for("cpu"), batch=max(batch, 8 * len(devices)),
    caption_len=caption_len, dims=dims, mesh=mesh,
  )  # fmt: skip
  loops = scan_collectives(fn.lower(*args).compile().as_text())
  log(f"collectives inside loop bodies, SGR train step on {len(devices)} devices:")
  for loop in loops:
    if loop["collectives"]:
      log(f"  {loop['body']}: {loop['collectives']}")
      for source in loop["sources"]:
        log(f"    {source['kind']} {source['shape']}: {_explain(source)}")
  busy = sum(bool(loop["collectives"]) for loop in loops)
  log(f"  {len(loops)} loops, {busy} with collectives")
  out["collectives"] = loops

  log(
    f"device memory from the compiled programs (captions padded to {F30K_CAPTION_LEN}):"
  )
  for preset, (_, device) in TARGETS.items():
    plan = plan_for(preset)
    programs = (
      (f"train step batch {batch}", train_step_program(
        "sgr", "float32", plan, batch=batch, caption_len=F30K_CAPTION_LEN, dims=dims)),
      (f"eval tile {plan.img_tile}x{plan.cap_tile}", scorer_program(
        "sgr", "float32", plan, caption_len=F30K_CAPTION_LEN, dims=dims)),
    )  # fmt: skip
    for name, (fn, args) in programs:
      need = memory_needs(fn, args)
      share = need["peak_estimate"] / DEVICE_MEMORY[device]
      out["memory"].append({"preset": preset, "program": name, **need, "share": share})
      log(
        f"  {preset} preset, {name}: {need['peak_estimate'] / 1e9:.1f} GB "
        f"(temporaries {need['temporaries'] / 1e9:.1f} GB) = {100 * share:.0f}% of "
        f"{device} ({DEVICE_MEMORY[device] / 1e9:.0f} GB)"
      )
  return out
