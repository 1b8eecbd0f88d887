"""Every program a run compiles, built for an accelerator on a machine without it.

Owns `python -m srem_jax.aot`: for a config and a target (`srem_jax.compile.targets`:
h100, h200, v5e-1, v5e-8, v4-8) it builds, over a mesh of the target's chips
and with the execution sizes and XLA compiler options a run there would
resolve, the programs of that run -- the train step of each phase, the
encoders, the evaluation scorer tile, the selection pass when the method
selects per epoch, NCR's steps and division pass for NCR -- from the same
functions the loops jit. Each is compiled by XLA for the target; a row per
program says whether it compiled, in how many seconds, its argument / output
/ temporary bytes per chip and their share of what a run may allocate there,
whether it fits, and where XLA reports a cost (TPU) its FLOPs, bytes
accessed and a roofline time.

    python -m srem_jax.aot --config=configs/flickr.py --target=v5e-8 --json=rows.json

Needs the target's compiler: libtpu for TPUs (`pip install -e '.[tpu]'`,
~0.7 GB), the CUDA 12 plugin for NVIDIA (`pip install -e '.[cuda_compile]'`,
~0.5 GB: no CUDA libraries are needed to compile). Both hook into every jax
process of the environment they are installed in (the plugin logs a line on
stderr at each start where no driver exists; libtpu takes a machine-wide
lock), so on a shared CPU machine install them apart and point this command
at them: `pip install --target DIR ...`, then `PYTHONPATH=DIR python -m
srem_jax.aot ...`. The exit status is 1 when a program does not compile or
does not fit.

Caveats: a program is compiled at the largest caption bucket (the run
compiles one train step per bucket; the largest needs the most memory); XLA's
cost analysis counts the body of a loop once, not once per iteration, so the
FLOPs, bytes and roofline of a program with loops (a row's `loops` > 0: every
train step and scorer, whose heads scan over chunks) are lower bounds.
"""

import dataclasses
import json
import os
import sys
import time

if __name__ == "__main__":
  # The CUDA plugin compiles without a GPU only if jax does not start it as a
  # backend (it would probe for a driver); the CPU backend hosts everything.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # libtpu lets one process per machine open it unless told otherwise; this
  # one opens no chip (topology descriptions only), so it need not wait for
  # a training process that holds the lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from srem_jax import config_checks, execution, sharding
from srem_jax.compile import targets
from srem_jax.compile.shapes import DataShapes, data_shapes
from srem_jax.errors import UserError
from srem_jax.methods import readings
from srem_jax.models.sgraf import DTYPES, build_model
from srem_jax.train import step


class _TargetDevice:
  """What `execution.resolve` reads of a device, for a target's chip: its
  platform and kind, and the memory a run there may allocate."""

  def __init__(self, target: targets.Target):
    self.platform = "gpu" if target.platform == "cuda" else "tpu"
    self.device_kind = target.device_kind
    self._limit = target.budget_bytes

  def memory_stats(self):
    return {"bytes_limit": self._limit}


def target_mesh(devices, data_axis: int = -1) -> Mesh:
  """The run's ("data",) mesh (`sharding.make_mesh`) over the target's chips
  (`data_axis` checked by `config_checks.check_mesh`)."""
  size = len(devices) if data_axis == -1 else data_axis
  return Mesh(
    np.asarray(devices[:size]), (sharding.DATA_AXIS,), axis_types=(AxisType.Auto,)
  )


# ---- the programs of a run --------------------------------------------------


def _spec(shape, dtype, where):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=where)


def _abstract(tree, where):
  return jax.tree.map(lambda x: _spec(x.shape, x.dtype, where), tree)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass
class Program:
  name: str
  fn: object  # a jitted function
  args: tuple


class RunPrograms:
  """The programs of one run of `config` on `mesh`, with abstract arguments."""

  def __init__(self, config, mesh, plan, shapes: DataShapes):
    self.config, self.mesh, self.plan, self.shapes = config, mesh, plan, shapes
    self.rows = sharding.data_sharding(mesh)
    self.full = sharding.replicated(mesh)
    self.model = build_model(config.model, shapes.vocab_size, plan)
    self.on_device = bool(config.data.features_on_device)

  def _state(self, tx):
    # Shapes only, so no plan: jax refuses compiler options on a jit traced
    # inside another (here `eval_shape` of the lambda).
    s = self.shapes
    state = jax.eval_shape(
      lambda: step.init_state(
        self.model, tx, seed=0, num_regions=s.num_regions, img_dim=s.img_dim,
        caption_len=s.caption_len, mesh=self.mesh,
      )
    )  # fmt: skip
    return _abstract(state, self.full)

  def _batch(self, size, *extra):
    """A loader batch (`pipeline._pair_batch`) of `size` pairs, plus `extra`
    boolean per-pair fields (the loop's "selected", the passes' "mask")."""
    s, rows = self.shapes, self.rows
    batch = {
      "tokens": _spec((size, s.caption_len), jnp.int32, rows),
      "lengths": _spec((size,), jnp.int32, rows),
      "cap_index": _spec((size,), jnp.int32, rows),
      "img_index": _spec((size,), jnp.int32, rows),
      "truly_clean": _spec((size,), jnp.bool_, rows),
    }
    if not self.on_device:
      batch["images"] = _spec((size, s.num_regions, s.img_dim), jnp.float32, rows)
    for key in extra:
      batch[key] = _spec((size,), jnp.bool_, rows)
    return batch

  def _features(self):
    if not self.on_device:
      return ()
    s = self.shapes
    shape = (s.train_images, s.num_regions, s.img_dim)
    return (_spec(shape, DTYPES[self.config.model.dtype], self.full),)

  def _variables(self, state):
    return {"params": state.params, "batch_stats": state.batch_stats}

  def train_steps(self) -> list[Program]:
    """The SREM / single-model update step of each phase, as `srem.run_steps`
    builds it (`make_train_step(..., summed=True)`)."""
    config = self.config
    tx = step.make_optimizer(config.train, steps_per_epoch=1000)
    state = self._state(tx)
    sums = {k: _spec((), jnp.float32, self.full) for k in step.SUMMED}
    selection = readings.resolve(config.loss)["selection"]
    external = config.loss.name == "srem" and selection == "epoch_gmm"
    phases = [("main", False, external)]
    if config.loss.name == "srem" and config.train.warmup_epochs > 0:
      phases.insert(0, ("warm-up", True, False))
    batch_size = config.train.batch_size
    out = []
    for phase, warmup, ext in phases:
      fn = step.make_train_step(
        self.model, tx, step.loss_options(config.loss), self.mesh, warmup=warmup,
        external_selection=ext, features_on_device=self.on_device, summed=True,
        plan=self.plan,
      )  # fmt: skip
      batch = self._batch(batch_size, *(("selected",) if ext else ()))
      name = f"train step {phase} b{batch_size}"
      out.append(Program(name, fn, ((state, sums), batch, *self._features())))
    return out

  def _pass_program(self, name, statistic, state) -> Program:
    from srem_jax.train import selection

    fn = selection.statistics_function(
      self.model, statistic, self.mesh, self.on_device, self.plan
    )
    size = _round_up(self.config.train.batch_size, self.mesh.devices.size)
    args = (self._variables(state), self._batch(size, "mask"), *self._features())
    return Program(f"{name} b{size}", fn, args)

  def selection_pass(self) -> list[Program]:
    config = self.config
    if config.loss.name != "srem":
      return []
    if readings.resolve(config.loss)["selection"] != "epoch_gmm":
      return []
    from srem_jax.train import selection

    state = self._state(step.make_optimizer(config.train, steps_per_epoch=1000))
    statistic = selection.SremStatistics(config.loss.tau, config.loss.energy_temp)
    return [self._pass_program("selection pass", statistic, state)]

  def ncr_steps(self) -> list[Program]:
    """NCR's warm-up and co-training steps as `co_training.Runner` jits them,
    and its division pass."""
    import functools

    from srem_jax.train import co_training, ncr_step

    config, mesh = self.config, self.mesh
    tx = ncr_step.make_optimizer(config.train)
    state = self._state(tx)
    sums = {k: _spec((), jnp.float32, self.full) for k in ncr_step.SUMMED}
    lr = _spec((), jnp.float32, self.full)
    kw = dict(model=self.model, tx=tx, mesh=mesh, margin=float(config.loss.margin))
    size = config.train.batch_size
    features = self._features()
    batch = self._batch(size)
    labelled = {**batch, "prob": _spec((size,), jnp.float32, self.rows)}
    out = [
      Program(
        f"ncr warm-up step b{size}",
        co_training.jit_step(
          functools.partial(ncr_step.warmup_step, **kw), mesh, self.plan
        ).jitted,
        ((state, sums), batch, lr, *features),
      )
    ]
    for unlabelled in (False, True):
      fn = functools.partial(
        ncr_step.co_train_step, **kw, kind=config.ncr.soft_margin,
        unlabelled=unlabelled,
      )  # fmt: skip
      batches = {"l": labelled, **({"u": batch} if unlabelled else {})}
      name = f"ncr co-train step{' +unlabelled' if unlabelled else ''} b{size}"
      args = ((state, sums), state, batches, lr, *features)
      out.append(Program(name, co_training.jit_step(fn, mesh, self.plan).jitted, args))
    statistic = ncr_step.PerSampleLoss(float(config.loss.margin))
    out.append(self._pass_program("ncr division pass", statistic, state))
    return out

  def evaluation(self) -> list[Program]:
    """The encoders and one scorer call (`retrieval.eval_functions`) over one
    image block and one caption tile at the static length."""
    from srem_jax.eval import retrieval

    s, plan, mesh = self.shapes, self.plan, self.mesh
    devices = mesh.devices.size
    fns = retrieval.eval_functions(self.model, mesh, plan)
    state = self._state(step.make_optimizer(self.config.train, steps_per_epoch=1000))
    variables = self._variables(state)
    size = _round_up(self.config.eval.batch_size, devices)
    images = _spec((size, s.num_regions, s.img_dim), jnp.float32, self.rows)
    tokens = _spec((size, s.caption_len), jnp.int32, self.rows)
    lengths = _spec((size,), jnp.int32, self.rows)
    img = jax.eval_shape(fns.encode_images, variables, images)
    cap = jax.eval_shape(fns.encode_captions, variables, tokens, lengths)
    img_tile, cap_tile = _round_up(plan.img_tile, devices), plan.cap_tile
    blocks = NamedSharding(mesh, P(None, sharding.DATA_AXIS))
    img_block = jax.tree.map(
      lambda x: _spec((1, img_tile) + x.shape[1:], x.dtype, blocks), img
    )
    cap_tiles = jax.tree.map(
      lambda x: _spec((1, cap_tile) + x.shape[1:], x.dtype, self.full), cap
    )
    index = _spec((), jnp.int32, self.full)
    columns = _spec((cap_tile,), jnp.int32, self.full)
    return [
      Program(f"encode images b{size}", fns.encode_images, (variables, images)),
      Program(
        f"encode captions b{size}", fns.encode_captions, (variables, tokens, lengths)
      ),
      Program(
        f"eval scorer tile {img_tile}x{cap_tile}",
        fns.score_block,
        (variables, img_block, index, (cap_tiles,), columns),
      ),
    ]

  def all(self) -> list[Program]:
    if self.config.loss.name == "ncr":
      method = self.ncr_steps()
    else:
      method = self.train_steps() + self.selection_pass()
    return method + self.evaluation()


# ---- compiling and reporting ------------------------------------------------


def _first_line(error: Exception) -> str:
  text = f"{type(error).__name__}: {error}".strip()
  return text.splitlines()[0][:300]


def compile_program(program: Program, target: targets.Target, dtype, precision):
  """(row, compiled executable or None) of one program compiled for `target`
  with the compiler options its jit carries (the plan's, as in a run)."""
  row = {"program": program.name, "target": target.name, "compiled": False}
  start = time.perf_counter()
  try:
    compiled = program.fn.lower(*program.args).compile()
  except Exception as error:  # an out-of-memory or unsupported op: reported
    row.update(compile_s=time.perf_counter() - start, error=_first_line(error))
    row.update(argument_bytes=None, output_bytes=None, temp_bytes=None, fits=False)
    return row, None
  row.update(compiled=True, compile_s=time.perf_counter() - start, error="")
  memory = compiled.memory_analysis()
  row.update(
    argument_bytes=memory.argument_size_in_bytes,
    output_bytes=memory.output_size_in_bytes,
    temp_bytes=memory.temp_size_in_bytes,
    alias_bytes=memory.alias_size_in_bytes,
  )
  need = (
    row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
  )
  row.update(
    peak_bytes=need,
    budget_bytes=target.budget_bytes,
    memory_share=need / target.budget_bytes,
    fits=need <= target.budget_bytes,
  )
  row["loops"] = compiled.as_text().count(" while(")
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax: one dict per partition
    cost = cost[0] if cost else None
  if cost and "flops" in cost:
    flops, accessed = float(cost["flops"]), float(cost.get("bytes accessed", 0.0))
    peak = target.peak(dtype, precision)
    row.update(
      flops=flops,
      bytes_accessed=accessed,
      peak_flops=peak,
      bandwidth=target.bandwidth,
      roofline_s=target.roofline(flops, accessed, dtype, precision),
    )
  return row, compiled


def run(
  config, target_name: str, *, caption_len=0, vocab_size=0, only="", hlo_dir="",
  log=print,
):  # fmt: skip
  """Compiles every program of a run of `config` for the target (those whose
  name contains `only`, if given) and returns their rows; with `hlo_dir`,
  each compiled program's HLO text is written there."""
  if target_name not in targets.TARGETS:
    raise UserError(
      f"--target={target_name!r}: expected one of {', '.join(targets.TARGETS)}"
    )
  target = targets.TARGETS[target_name]
  try:
    devices = target.devices()
  except (ImportError, RuntimeError, ValueError) as error:
    raise UserError(
      f"--target={target_name}: cannot build {target.platform} devices here "
      f"({_first_line(error)}); install the compiler: {INSTALL[target.platform]}"
    ) from None
  config_checks.validate(config, len(devices))
  mesh = target_mesh(devices, config.mesh.data)
  plan = execution.resolve(config.execution, device=_TargetDevice(target))
  shapes = data_shapes(config, caption_len, vocab_size)
  dtype, precision = config.model.dtype, plan.matmul_precision
  log(
    f"target {target.name}: {mesh.devices.size} x {devices[0].device_kind}, "
    f"{target.budget_bytes / 1e9:.1f} GB usable per chip; peak "
    f"{target.peak(dtype, precision) / 1e12:.1f} TFLOP/s ({dtype}, precision "
    f"{precision}), {target.bandwidth / 1e12:.2f} TB/s"
  )
  log(f"execution: {plan.reason}")
  if shapes.note:
    log(f"assumed: {shapes.note}")
  rows = []
  log(HEADER)
  for program in RunPrograms(config, mesh, plan, shapes).all():
    if only not in program.name:
      continue
    row, compiled = compile_program(program, target, dtype, precision)
    rows.append(row)
    if hlo_dir and compiled is not None:
      os.makedirs(hlo_dir, exist_ok=True)
      name = program.name.replace(" ", "_").replace("+", "")
      path = os.path.join(hlo_dir, f"{target.name}.{name}.hlo.txt")
      with open(path, "w") as f:
        f.write(compiled.as_text())
    log(format_row(row))
  if not rows:
    raise UserError(f"--programs={only!r}: no program of this run has it in its name")
  return rows


INSTALL = {
  "tpu": "pip install -e '.[tpu]' (libtpu, ~0.7 GB)",
  "cuda": "pip install -e '.[cuda_compile]' (the CUDA 12 plugin alone, ~0.5 GB)",
}

HEADER = (
  f"{'program':34s} {'status':8s} {'compile_s':>9s} {'args GB':>8s} "
  f"{'out GB':>7s} {'temp GB':>8s} {'share':>6s} {'fits':>4s} "
  f"{'GFLOP':>9s} {'GB moved':>9s} {'roofline ms':>11s}"
)


def format_row(row: dict) -> str:
  if not row["compiled"]:
    return f"{row['program']:34s} {'FAILED':8s} {row['compile_s']:9.1f}  {row['error']}"
  gb = lambda key: f"{row[key] / 1e9:.3f}"
  cost = "  (no cost reported)"
  if "flops" in row:
    cost = (
      f" {row['flops'] / 1e9:9.1f} {row['bytes_accessed'] / 1e9:9.3f} "
      f"{1e3 * row['roofline_s']:11.3f}"
    )
  return (
    f"{row['program']:34s} {'compiled':8s} {row['compile_s']:9.1f} "
    f"{gb('argument_bytes'):>8s} {gb('output_bytes'):>7s} {gb('temp_bytes'):>8s} "
    f"{100 * row['memory_share']:5.1f}% {'yes' if row['fits'] else 'NO':>4s}{cost}"
  )


# ---- command line -----------------------------------------------------------


def _define_flags() -> dict:
  from srem_jax import cli

  return dict(
    config=cli.define_config_flag(),
    target=flags.DEFINE_enum(
      "target", None, list(targets.TARGETS), "Accelerator to compile for."
    ),
    json=flags.DEFINE_string("json", None, "Write the rows to this JSON file."),
    caption_len=flags.DEFINE_integer(
      "caption_len", 0, "Static caption length (0 = the config's or F30K's 77)."
    ),
    vocab_size=flags.DEFINE_integer(
      "vocab_size", 0, "Vocabulary size (0 = the dataset's, or F30K's 8481)."
    ),
    programs=flags.DEFINE_string(
      "programs", "", "Only the programs whose name contains this (e.g. 'eval')."
    ),
    hlo_dir=flags.DEFINE_string(
      "hlo_dir", "", "Write each compiled program's HLO text into this folder."
    ),
  )


def main(argv, flag_values) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = flag_values["config"].value
  if config is None:
    raise UserError("--config is required, e.g. --config=configs/flickr.py")
  if flag_values["target"].value is None:
    raise UserError(f"--target is required: one of {', '.join(targets.TARGETS)}")
  rows = run(
    config,
    flag_values["target"].value,
    caption_len=flag_values["caption_len"].value,
    vocab_size=flag_values["vocab_size"].value,
    only=flag_values["programs"].value,
    hlo_dir=flag_values["hlo_dir"].value,
    log=lambda line: print(line, flush=True),
  )
  path = flag_values["json"].value
  if path:
    with open(path, "w") as f:
      json.dump(rows, f, indent=1)
  bad = [row["program"] for row in rows if not (row["compiled"] and row["fits"])]
  total = sum(row["compile_s"] for row in rows)
  print(f"{len(rows)} programs, {total:.0f} s compiling", flush=True)
  if any(row.get("loops") and "flops" in row for row in rows):
    print(
      "FLOPs, bytes moved and roofline count each loop body once: for programs "
      "with loops they are lower bounds"
    )
  if bad:
    print(f"error: does not compile or fit: {', '.join(bad)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  from srem_jax import cli

  _flag_values = _define_flags()
  cli.run(lambda argv: main(argv, _flag_values))
