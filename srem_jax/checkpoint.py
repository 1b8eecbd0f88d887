"""Checkpoints of a run: the latest (for resuming) and the best (by val rSum).

One orbax save holds the whole train state (params, batch stats, optimizer
state, step, RNG), the data-iterator state, the per-caption selection state and
a JSON record (epoch, best rSum, config). Two managers in the workdir:
`checkpoints/` keeps the latest save, `best/` the best validation one. A save
killed half way leaves a temporary folder that orbax ignores and cleans up, so
the next run resumes from the previous complete checkpoint.

    ckpt = Checkpointer(workdir)
    ckpt.save_latest(step, state, loader.get_state(), selection, record)
    restored = ckpt.restore_latest(abstract_state, abstract_selection)

The workdir may be a local folder or a URL (`gs://...`) that all processes share.
"""

import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from srem_jax import paths
from srem_jax.errors import UserError


class Restored(NamedTuple):
  state: Any
  data_state: dict | None
  selection: Any
  record: dict


def _manager(directory: str, name: str) -> ocp.CheckpointManager:
  # Each manager needs its own barrier names: on several processes, the best
  # and the latest saves of the same step would otherwise share the
  # "async_write_complete.<step>" barrier and fail.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=1,
    create=True,
    cleanup_tmp_directories=True,
    multiprocessing_options=ocp.options.MultiprocessingOptions(
      barrier_sync_key_prefix=name
    ),
  )
  return ocp.CheckpointManager(paths.as_path(directory), options=options)


class Checkpointer:
  def __init__(self, workdir: str):
    self.latest_dir = os.path.join(workdir, "checkpoints")
    self.best_dir = os.path.join(workdir, "best")
    self.latest = _manager(self.latest_dir, "latest")
    self.best = _manager(self.best_dir, "best")

  def save_latest(self, step, state, data_state, selection, record) -> None:
    self.latest.save(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        selection=ocp.args.StandardSave(selection),
        data=ocp.args.JsonSave(data_state),
        record=ocp.args.JsonSave(record),
      ),
      force=True,
    )

  def save_best(self, step, state, record) -> None:
    self.best.save(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
      ),
      force=True,
    )

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def restore_latest(self, abstract_state, abstract_selection) -> Restored | None:
    out = _restore_last(
      self.latest,
      state=ocp.args.StandardRestore(abstract_state),
      selection=ocp.args.StandardRestore(abstract_selection),
      data=ocp.args.JsonRestore(),
      record=ocp.args.JsonRestore(),
    )
    if out is None:
      return None
    return Restored(out.state, out.data, out.selection, out.record)

  def restore_best(self, abstract_state) -> Restored | None:
    out = _restore_last(
      self.best,
      state=ocp.args.StandardRestore(abstract_state),
      record=ocp.args.JsonRestore(),
    )
    if out is None:
      return None
    return Restored(out.state, None, None, out.record)

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()


def _restore_last(manager, **items):
  """The newest step of `manager` restored as `items`, or None if it holds none."""
  step = manager.latest_step()
  if step is None:
    return None
  return manager.restore(step, args=ocp.args.Composite(**items))


def _is_step_folder(directory) -> bool:
  return (directory / "state").is_dir() and directory.name.isdigit()


def load_variables(path: str) -> tuple[dict, dict]:
  """Model variables and record from a workdir or a checkpoint folder.

  `path` may be a run's workdir (its best checkpoint is used, else its latest),
  a `best/` or `checkpoints/` manager folder, or one step folder inside it.
  Returns ({"params": ..., "batch_stats": ...} as NumPy trees, record).
  """
  members, record = load_members(path)
  if len(members) != 1:
    raise UserError(
      f"checkpoint {path}: holds {len(members)} models (an NCR run); "
      "evaluate it with `python -m srem_jax.evaluate`, which averages them"
    )
  return members[0], record


def _variables(state, source) -> list[dict]:
  """One variables dict per model of a restored state: an NCR run's state
  is {"a": ..., "b": ...}, every other method's a single train state."""
  if isinstance(state, dict) and "params" not in state and state:
    if all(isinstance(v, dict) and "params" in v for v in state.values()):
      return [m for name in sorted(state) for m in _variables(state[name], source)]
  if not isinstance(state, dict) or "params" not in state:
    raise UserError(f"checkpoint {source}: holds no model parameters")
  return [{"params": state["params"], "batch_stats": state.get("batch_stats", {})}]


def load_members(path: str) -> tuple[list[dict], dict]:
  """Like `load_variables`, with every model of the run: [a, b] for NCR."""
  root = paths.as_path(path)
  if not root.exists():
    raise UserError(f"checkpoint {root} does not exist")
  for directory in (root / "best", root / "checkpoints", root):
    if not directory.is_dir():
      continue
    step = None
    if _is_step_folder(directory):
      directory, step = directory.parent, int(directory.name)
    try:
      manager = ocp.CheckpointManager(directory)
    except Exception:
      continue
    step = step if step is not None else manager.latest_step()
    if step is None:
      continue
    try:
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), record=ocp.args.JsonRestore()
        ),
      )
    except Exception as e:  # an unreadable or foreign checkpoint, not our bug
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise UserError(
        f"checkpoint {directory / str(step)}: not a readable srem_jax checkpoint "
        f"({type(e).__name__}: {first_line})"
      ) from None
    state = jax.tree.map(np.asarray, restored.state)
    members = _variables(state, directory / str(step))
    return members, dict(restored.record or {})
  raise UserError(
    f"no orbax checkpoint found at {root} (expected a run's workdir, its best/ "
    "or checkpoints/ folder, or one step folder inside them)"
  )


def _shapes_by_name(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(str(getattr(k, "key", k)) for k in key_path): tuple(np.shape(leaf))
    for key_path, leaf in leaves
  }


def check_shapes(variables, expected, source: str) -> None:
  """Raises UserError naming the first parameter whose shape differs.

  `expected` is the model's abstract variables (`jax.eval_shape` of its init),
  so a checkpoint from another model size fails here with a name, not inside
  the model with a shape traceback.
  """
  found, wanted = _shapes_by_name(variables), _shapes_by_name(expected)
  # Weights first: a wrong size shows in both, and the weight's name says more.
  for name in sorted(wanted, key=lambda n: not n.startswith("params/")):
    shape = wanted[name]
    if name not in found:
      raise UserError(
        f"checkpoint {source}: has no parameter {name} that the model (per the "
        "config) needs; was it trained with another config.model?"
      )
    if found[name] != shape:
      raise UserError(
        f"checkpoint {source}: parameter {name} has shape {found[name]} but the "
        f"model built from the config expects {shape}; evaluate with the config "
        "(config.model fields) the checkpoint was trained with"
      )
  extra = sorted(set(found) - set(wanted))
  if extra:
    raise UserError(
      f"checkpoint {source}: parameter {extra[0]} is not in the model built from "
      "the config; evaluate with the config the checkpoint was trained with"
    )
