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
"""

import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from srem_jax.errors import UserError


class Restored(NamedTuple):
  state: Any
  data_state: dict | None
  selection: Any
  record: dict


def _manager(directory: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=1, create=True, cleanup_tmp_directories=True
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpointer:
  def __init__(self, workdir: str):
    self.latest_dir = os.path.join(workdir, "checkpoints")
    self.best_dir = os.path.join(workdir, "best")
    self.latest = _manager(self.latest_dir)
    self.best = _manager(self.best_dir)

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
    step = self.latest.latest_step()
    if step is None:
      return None
    out = self.latest.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        selection=ocp.args.StandardRestore(abstract_selection),
        data=ocp.args.JsonRestore(),
        record=ocp.args.JsonRestore(),
      ),
    )
    return Restored(out.state, out.data, out.selection, out.record)

  def restore_best(self, abstract_state) -> Restored | None:
    step = self.best.latest_step()
    if step is None:
      return None
    out = self.best.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        record=ocp.args.JsonRestore(),
      ),
    )
    return Restored(out.state, None, None, out.record)

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()


def load_variables(path: str) -> tuple[dict, dict]:
  """Model variables and record from a workdir or a checkpoint folder.

  `path` may be a run's workdir (its best checkpoint is used, else its latest),
  a `best/` or `checkpoints/` manager folder, or one step folder inside it.
  Returns ({"params": ..., "batch_stats": ...} as NumPy trees, record).
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise UserError(f"checkpoint {path} does not exist")
  candidates = [os.path.join(path, "best"), os.path.join(path, "checkpoints"), path]
  for directory in candidates:
    if not os.path.isdir(directory):
      continue
    if os.path.isdir(os.path.join(directory, "state")):  # a step folder
      step_dir, directory = directory, os.path.dirname(directory)
      step = int(os.path.basename(step_dir))
    else:
      step = None
    try:
      manager = ocp.CheckpointManager(directory)
    except Exception:
      continue
    step = step if step is not None else manager.latest_step()
    if step is None:
      continue
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), record=ocp.args.JsonRestore()
      ),
    )
    state = jax.tree.map(np.asarray, restored.state)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return variables, dict(restored.record or {})
  raise UserError(
    f"no orbax checkpoint found at {path} (expected a run's workdir, its best/ "
    "or checkpoints/ folder, or one step folder inside them)"
  )
