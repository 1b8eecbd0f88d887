"""Event files read back two ways: TensorBoard's own loader, or the TFRecord
framing parsed here (CRC-32C checked bit by bit) with tensorboardX's protobuf
classes. Both give `Event` messages with the same field names."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_framed(path) -> list:
  """Frames of (length, masked CRC of it, payload, masked CRC of it)."""
  data = open(path, "rb").read()
  events, pos = [], 0
  while pos < len(data):
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    assert header_crc == _masked(crc32c(header))
    payload = data[pos + 12 : pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
    assert payload_crc == _masked(crc32c(payload))
    events.append(event_pb2.Event.FromString(payload))
    pos += 16 + length
  assert pos == len(data)
  return events


def tensorboard_installed() -> bool:
  try:
    import tensorboard.backend.event_processing.event_file_loader  # noqa: F401
  except ImportError:
    return False
  return True


def read_with_tensorboard(path) -> list:
  from tensorboard.backend.event_processing import event_file_loader

  return list(event_file_loader.LegacyEventFileLoader(str(path)).Load())


def read_best(path) -> list:
  """TensorBoard's loader where it is installed, the framing reader elsewhere."""
  return (read_with_tensorboard if tensorboard_installed() else read_framed)(path)


def event_files(logdir) -> list[str]:
  """The event files of a folder, oldest first (names start with the time)."""
  return sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))


def values(events) -> list[tuple]:
  """(step, Summary.Value) of every summary value, in file order."""
  return [(e.step, v) for e in events for v in e.summary.value]
