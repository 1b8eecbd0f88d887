"""TensorBoard event files of a run, written with tensorboardX (no TensorFlow).

Process 0 writes `<workdir>/tensorboard/events.out.tfevents.*`:
- at start, the resolved config as text (`config`);
- every epoch, each numeric field of the train and val records as a scalar
  (`train/loss`, `val/rsum`, ...), histograms of every training pair's energy
  and swapped entropy, truly clean vs truly noisy
  (`pairs/energy_truly_clean`, ...), and the PNGs of `plots/` as images
  (`plots/loss`, ...);
- at the end, the final test metrics as scalars (`test/rsum`, ...) and as the
  metrics of an hparams session whose hyper-parameters are the flattened
  config, so `tensorboard --logdir workdirs` compares runs side by side.

Summaries are built by `tensorboardX.summary` and written synchronously by
its `EventsWriter`: `tensorboardX.SummaryWriter` queues events to a thread
whose `flush()` does not wait for the queue, while here an epoch's events are
in the file when `log_epoch` returns.

    writer = SummaryWriter("workdirs/demo/tensorboard")
    writer.scalar("val/rsum", 312.5, step=930)
    writer.close()
"""

import io
import itertools
import json
import math
import os
import time

import jax
import numpy as np
from PIL import Image
from tensorboardX import event_file_writer, record_writer, summary
from tensorboardX.proto import event_pb2, summary_pb2

from srem_jax import paths

HISTOGRAM_BINS = 64
_SERIAL = itertools.count()


class _BucketObject:
  """An event file in a bucket, rewritten whole on each flush: objects cannot
  be appended to, and event files grow by ~180 KB per epoch (mostly PNGs)."""

  def __init__(self, path: str):
    self._path, self._data = paths.as_path(path), io.BytesIO()

  def write(self, data: bytes) -> None:
    self._data.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._data.getvalue())

  def close(self) -> None:
    self.flush()


class _BucketObjects:
  """tensorboardX's writer factory for a URL scheme, through `etils.epath`."""

  open = staticmethod(_BucketObject)

  def directory_check(self, path: str) -> None:
    paths.as_path(path).mkdir(parents=True, exist_ok=True)


class SummaryWriter:
  """Appends events to a fresh event file in `logdir` (a folder or a URL)."""

  def __init__(self, logdir: str):
    self.logdir = paths.absolute(logdir)
    if paths.is_url(self.logdir):
      # In place of tensorboardX's own writers for gs:// and s3://, which need
      # google-cloud-storage or boto3: epath reaches every bucket the run does.
      scheme = self.logdir.split(":", 1)[0]
      record_writer.register_writer_factory(scheme, _BucketObjects())
    record_writer.directory_check(self.logdir)
    # The file is named by the second it was opened and the host; the process
    # and a serial keep two writers of one second from sharing (truncating) it.
    self._events = event_file_writer.EventsWriter(
      os.path.join(self.logdir, "events"), f".{os.getpid()}.{next(_SERIAL)}"
    )
    self._events.flush()

  @classmethod
  def for_workdir(cls, workdir: str) -> "SummaryWriter | None":
    """A writer in `<workdir>/tensorboard` on process 0; None elsewhere."""
    if jax.process_index() != 0:
      return None
    return cls(paths.as_path(workdir) / "tensorboard")

  def _write(self, summary_proto, step: int) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step))
    event.summary.CopyFrom(summary_proto)
    self._events.write_event(event)

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._write(summary.scalar(tag, float(value)), step)

  def histogram(self, tag: str, values, step: int, bins: int = HISTOGRAM_BINS):
    """Equal-width bins over the finite values; nothing when there are none."""
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size:
      self._write(summary.histogram(tag, values, bins), step)

  def image(self, tag: str, png: bytes, step: int) -> None:
    """A PNG as it is, not decoded and re-encoded."""
    with Image.open(io.BytesIO(png)) as picture:
      (width, height), channels = picture.size, len(picture.getbands())
    image = summary_pb2.Summary.Image(
      height=height, width=width, colorspace=channels, encoded_image_string=png
    )
    value = summary_pb2.Summary.Value(tag=tag, image=image)
    self._write(summary_pb2.Summary(value=[value]), step)

  def text(self, tag: str, markdown: str, step: int) -> None:
    """Shown by TensorBoard's text dashboard under `<tag>/text_summary`."""
    self._write(summary.text(tag, markdown), step)

  def hparams(self, hparams: dict, metrics: dict, step: int) -> None:
    """One hparams session: the values in `hparams`, the scalars in `metrics`."""
    for part in summary.hparams(hparams, metrics):
      self._write(part, step)
    for tag, value in metrics.items():
      self.scalar(tag, value, step)

  def flush(self) -> None:
    self._events.flush()

  def close(self) -> None:
    self._events.close()


def _numeric(value) -> bool:
  if isinstance(value, (bool, str, dict, list)) or value is None:
    return False
  return math.isfinite(float(value))


def _flatten(tree: dict, prefix: str, sep: str):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}{sep}", sep)
    else:
      yield f"{prefix}{key}", value


def log_config(writer: SummaryWriter | None, config, step: int) -> None:
  """The resolved config as JSON, shown as a code block."""
  if writer is None:
    return
  text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
  writer.text("config", "\n".join("    " + line for line in text.splitlines()), step)
  writer.flush()


def log_epoch(
  writer: SummaryWriter | None, records: list[dict], pairs=None, figures=()
) -> None:
  """Writes an epoch's records, pair histograms and figures, then flushes.

  A record is what `Reporter.write` receives: `step`, `epoch`, `split` and
  the metrics; every numeric field becomes `<split>/<field>`. Non-finite
  values are skipped (TensorBoard draws them as gaps anyway, and they only
  arise for empty groups such as "noisy" at 0% noise). `pairs` holds the
  epoch's per-pair `energy`, `entropy` and `truly_clean` arrays; `figures`
  are PNG paths, tagged `plots/<name>`. Both go at the last record's step.
  """
  if writer is None:
    return
  for record in records:
    split, step = record["split"], int(record["step"])
    for key, value in record.items():
      if key not in ("step", "epoch", "split") and _numeric(value):
        writer.scalar(f"{split}/{key}", float(value), step)
  if pairs is not None:
    truth = np.asarray(pairs["truly_clean"], bool)
    for key in ("energy", "entropy"):
      values = np.asarray(pairs[key])
      writer.histogram(f"pairs/{key}_truly_clean", values[truth], step)
      writer.histogram(f"pairs/{key}_truly_noisy", values[~truth], step)
  for path in figures:
    path = paths.as_path(path)
    writer.image(f"plots/{path.stem}", path.read_bytes(), step)
  writer.flush()


def log_test(writer: SummaryWriter | None, config, test: dict, step: int) -> None:
  """The final test metrics (`test/<metric>`, `test/coco1k/<metric>` for the
  COCO protocol) as an hparams session over the flattened config."""
  if writer is None:
    return
  hparams = {
    key: value if isinstance(value, (bool, int, float, str)) else str(value)
    for key, value in _flatten(config.to_dict(), "", ".")
    if value is not None
  }
  metrics = {
    key: float(value) for key, value in _flatten(test, "test/", "/") if _numeric(value)
  }
  writer.hparams(hparams, metrics, step)
  writer.flush()
