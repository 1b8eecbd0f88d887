"""TensorBoard event files written without TensorFlow or any extra package.

An event file is a sequence of TFRecord frames (length, masked CRC-32C of the
length, payload, masked CRC-32C of the payload), each payload one serialized
`tensorflow.Event` protobuf. The few messages needed here (Event, Summary,
Summary.Value, HistogramProto) are encoded by hand in the protobuf wire
format, ~60 lines: that avoids `tensorboardX` or `tensorboard` as install
dependencies (neither is pulled in by the stack; the `tensorboard` package
alone brings grpcio, markdown and werkzeug) and any coupling to the protobuf
runtime's major version. TensorBoard itself only reads the files.

    writer = SummaryWriter("workdirs/demo/tensorboard")
    writer.scalar("val/rsum", 312.5, step=930)
    writer.close()  # or flush(): nothing else is held open
"""

import math
import os
import socket
import struct
import time

import jax
import numpy as np

from srem_jax import paths

# ---- CRC-32C (Castagnoli), as TFRecord frames use it ------------------------


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masking, so a CRC of data that holds CRCs stays well mixed."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(payload: bytes) -> bytes:
  length = struct.pack("<Q", len(payload))
  return (
    length
    + struct.pack("<I", masked_crc32c(length))
    + payload
    + struct.pack("<I", masked_crc32c(payload))
  )


# ---- protobuf wire format for the event messages ----------------------------

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # negative int64 travel as ten-byte two's complement
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
  return _key(field, _BYTES) + _varint(len(payload)) + payload


def _double_field(field: int, value: float) -> bytes:
  return _key(field, _FIXED64) + struct.pack("<d", value)


def _event(step: int, *, summary: bytes = b"", file_version: str = "") -> bytes:
  # Event: wall_time=1 (double), step=2 (int64), file_version=3, summary=5.
  out = _double_field(1, time.time()) + _key(2, _VARINT) + _varint(int(step))
  if file_version:
    out += _bytes_field(3, file_version.encode())
  if summary:
    out += _bytes_field(5, summary)
  return out


def _summary_value(tag: str, *, simple_value=None, histo: bytes = b"") -> bytes:
  # Summary { repeated Value value = 1 }; Value: tag=1, simple_value=2 (float),
  # histo=5.
  value = _bytes_field(1, tag.encode())
  if simple_value is not None:
    value += _key(2, _FIXED32) + struct.pack("<f", simple_value)
  if histo:
    value += _bytes_field(5, histo)
  return _bytes_field(1, value)


def _histogram(values: np.ndarray, bins: int) -> bytes:
  # HistogramProto: min=1 max=2 num=3 sum=4 sum_squares=5 (doubles),
  # bucket_limit=6 and bucket=7 (packed doubles). Bucket i counts values in
  # (limit[i-1], limit[i]]; the first bucket starts at -inf.
  counts, edges = np.histogram(values, bins=bins)
  packed = lambda xs: struct.pack(f"<{len(xs)}d", *xs)
  return (
    _double_field(1, float(values.min()))
    + _double_field(2, float(values.max()))
    + _double_field(3, float(values.size))
    + _double_field(4, float(values.sum()))
    + _double_field(5, float(np.square(values).sum()))
    + _bytes_field(6, packed(edges[1:].tolist()))
    + _bytes_field(7, packed(counts.astype(np.float64).tolist()))
  )


# ---- the writer --------------------------------------------------------------


class SummaryWriter:
  """Appends scalar and histogram events to a fresh event file in `logdir`.

  Events are buffered until `flush()`, which appends them to the local file
  or, for a bucket URL (whose objects cannot be appended to), rewrites the
  object whole; event files grow by a few KB per epoch. No handle stays
  open, so a killed run loses only the unflushed events.
  """

  def __init__(self, logdir: str):
    logdir = paths.as_path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    self._file = logdir / (
      f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    )
    self.path = str(self._file)
    self._flushed = b""
    self._pending = bytearray(tfrecord_frame(_event(0, file_version="brain.Event:2")))
    self.flush()

  @classmethod
  def for_workdir(cls, workdir: str) -> "SummaryWriter | None":
    """A writer in `<workdir>/tensorboard` on process 0; None elsewhere."""
    if jax.process_index() != 0:
      return None
    return cls(paths.as_path(workdir) / "tensorboard")

  def scalar(self, tag: str, value: float, step: int) -> None:
    summary = _summary_value(tag, simple_value=float(value))
    self._pending += tfrecord_frame(_event(step, summary=summary))

  def histogram(self, tag: str, values, step: int, bins: int = 30) -> None:
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
      return
    summary = _summary_value(tag, histo=_histogram(values, bins))
    self._pending += tfrecord_frame(_event(step, summary=summary))

  def flush(self) -> None:
    if not self._pending:
      return
    if paths.is_url(self._file):
      self._flushed += bytes(self._pending)
      self._file.write_bytes(self._flushed)
    else:
      with self._file.open("ab") as f:
        f.write(bytes(self._pending))
    self._pending.clear()

  def close(self) -> None:
    self.flush()


def log_epoch(writer: SummaryWriter | None, records: list[dict]) -> None:
  """Writes every numeric field of metrics records as `<split>/<field>`.

  A record is what `Reporter.write` receives: `step`, `epoch`, `split` and
  the metrics. Non-finite values are skipped (TensorBoard draws them as gaps
  anyway, and they only arise for empty groups such as "noisy" at 0% noise).
  """
  if writer is None:
    return
  for record in records:
    split, step = record["split"], int(record["step"])
    for key, value in record.items():
      if key in ("step", "epoch", "split") or isinstance(
        value, (bool, str, dict, list)
      ):
        continue
      if value is None or not math.isfinite(float(value)):
        continue
      writer.scalar(f"{split}/{key}", float(value), step)
  writer.flush()
