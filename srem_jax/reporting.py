"""What a run tells its user: progress lines with ETA, metrics files, tables.

Process 0 writes `metrics.jsonl` (one JSON object per line) in the workdir,
a local folder or a bucket URL; every process prints. A `Progress` turns step
counts into rate and ETA.

    report = Reporter(workdir)
    report.write({"step": 10, "epoch": 0, "split": "train", "loss": 1.2})
    report.log(progress.line(step))
"""

import json
import math
import sys
import time

import jax
import numpy as np
from etils import epath

from srem_jax import paths

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def _jsonable(value):
  if isinstance(value, (np.generic, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


class Reporter:
  """Prints on every process, writes files on process 0 only."""

  def __init__(self, workdir: str):
    self.workdir = epath.Path(workdir)
    self.is_main = jax.process_index() == 0
    self.metrics_path = self.workdir / "metrics.jsonl"

  def log(self, message: str) -> None:
    print(message, flush=True, file=sys.stdout)

  def write(self, record: dict) -> None:
    if not self.is_main:
      return
    line = json.dumps(_jsonable(record)) + "\n"
    if paths.is_url(self.metrics_path):
      # Bucket objects cannot be appended to; the file is a few KB per run.
      before = self.metrics_path.read_text() if self.metrics_path.exists() else ""
      self.metrics_path.write_text(before + line)
    else:
      with self.metrics_path.open("a") as f:
        f.write(line)

  def write_json(self, name: str, obj: dict) -> str:
    path = self.workdir / name
    if self.is_main:
      # Written aside and renamed, so a kill never leaves half a file.
      tmp = self.workdir / f"{name}.tmp"
      tmp.write_text(json.dumps(_jsonable(obj), indent=2))
      tmp.replace(path)
    return str(path)


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Rate and ETA over the steps done since this process started."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self.start_step = start_step
    self.start_time = time.monotonic()

  def elapsed(self) -> float:
    return time.monotonic() - self.start_time

  def rate(self, step: int) -> float:
    elapsed = time.monotonic() - self.start_time
    return (step - self.start_step) / elapsed if elapsed > 0 else 0.0

  def line(self, step: int) -> str:
    rate = self.rate(step)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    eta_text = format_duration(eta) if math.isfinite(eta) else "?"
    return f"{step}/{self.total} steps, {rate:.2f} steps/s, ETA {eta_text}"


def recall_table(rows: dict[str, dict]) -> str:
  """A fixed-width table of recalls, one row per named result."""
  header = (
    f"{'':<12} {'i2t R@1':>8} {'R@5':>6} {'R@10':>6} "
    f"{'t2i R@1':>8} {'R@5':>6} {'R@10':>6} {'rSum':>7}"
  )
  lines = [header]
  for name, m in rows.items():
    lines.append(
      f"{name:<12} {m['i2t_r1']:>8.1f} {m['i2t_r5']:>6.1f} {m['i2t_r10']:>6.1f} "
      f"{m['t2i_r1']:>8.1f} {m['t2i_r5']:>6.1f} {m['t2i_r10']:>6.1f} {m['rsum']:>7.1f}"
    )
  return "\n".join(lines)
