"""What a run tells its user: progress lines with ETA, metrics files, tables.

Process 0 writes `metrics.jsonl` (one JSON object per line) in the workdir,
a local folder or a bucket URL; every process prints. A `Progress` turns step
counts into rate and ETA; a `PassProgress` prints them for one long pass
(preparing data, all-pairs scoring, the selection pass).

    report = Reporter(workdir)
    report.write({"step": 10, "epoch": 0, "split": "train", "loss": 1.2})
    report.log(progress.line(step))
    score_all(..., progress=PassProgress("test scoring", total, "tiles"))
"""

import json
import math
import sys
import time
from typing import Callable

import jax
import numpy as np
from etils import epath

from srem_jax import paths


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


def _rate_text(rate: float) -> str:
  return f"{rate:,.0f}" if rate >= 100 else f"{rate:.2f}"


class PassProgress:
  """Done/total, rate and ETA of one long pass, printed as it advances.

  On a terminal one line is redrawn in place (at most every `redraw_s`);
  anywhere else (a log file, a pipe) a new line is printed each time another
  `every_fraction` of the work is done or `every_s` seconds have passed, so a
  log holds a few plain lines and no carriage returns. Nothing is printed
  until `delay_s` has passed, so short passes (a small validation split) stay
  silent; a pass that printed anything ends with a line giving its duration.
  The rate counts from the first completed unit, which carries compilation.
  `items=(n, "pairs")` reports the rate in pairs (n over the whole pass)
  instead of units. The object is a `progress(done, total)` callback, as
  `tiling.score_all` takes; `total=None` takes the total from the first call.
  """

  def __init__(
    self,
    label: str,
    total: int | None,
    unit: str,
    *,
    items: tuple[float, str] | None = None,
    enabled: bool = True,
    delay_s: float = 0.0,
    every_fraction: float = 0.1,
    every_s: float = 30.0,
    redraw_s: float = 0.2,
    stream=None,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.label, self.total, self.unit = label, total, unit
    self.items = items
    self.enabled = enabled
    self.delay_s, self.every_fraction, self.every_s = delay_s, every_fraction, every_s
    self.redraw_s = redraw_s
    self.stream = stream if stream is not None else sys.stdout
    isatty = getattr(self.stream, "isatty", None)
    self.terminal = bool(isatty and isatty())
    self.clock = clock
    self.start = clock()
    self.first = None  # (done, time) at the first completed unit
    self.shown_done, self.shown_time = 0, None
    self.width = 0
    self.finished = False

  def line(self, done: int, now: float) -> str:
    text = f"{self.label}: {done}/{self.total} {self.unit}"
    if done >= self.total:
      return f"{text}, done in {format_duration(now - self.start)}"
    rate = 0.0
    if self.first is not None and now > self.first[1] and done > self.first[0]:
      rate = (done - self.first[0]) / (now - self.first[1])
    if rate <= 0:
      return f"{text}, ETA ?"
    scale, name = (
      (self.items[0] / self.total, self.items[1]) if self.items else (1, self.unit)
    )
    eta = format_duration((self.total - done) / rate)
    return f"{text}, {_rate_text(rate * scale)} {name}/s, ETA {eta}"

  def _due(self, done: int, now: float) -> bool:
    if done >= self.total:
      return self.shown_time is not None or now - self.start >= self.delay_s
    if now - self.start < self.delay_s:
      return False
    if self.shown_time is None:
      return True
    if self.terminal:
      return now - self.shown_time >= self.redraw_s
    step = max(1, math.ceil(self.every_fraction * self.total))
    return (
      done // step > self.shown_done // step or now - self.shown_time >= self.every_s
    )

  def __call__(self, done: int, total: int | None = None) -> None:
    if self.total is None:
      self.total = total
    if not self.enabled or self.finished or not self.total:
      return
    now = self.clock()
    if self.first is None:
      self.first = (done, now)
    if not self._due(done, now):
      return
    text = self.line(done, now)
    end = done >= self.total
    if self.terminal:
      pad = " " * max(0, self.width - len(text))
      self.stream.write("\r" + text + pad + ("\n" if end else ""))
      self.width = len(text)
    else:
      self.stream.write(text + "\n")
    self.stream.flush()
    self.shown_done, self.shown_time = done, now
    self.finished = end


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
