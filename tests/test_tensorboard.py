"""Event files: framing, CRCs and protobuf payloads read back independently.

The reader here parses the TFRecord framing itself, checks CRC-32C with a
bit-at-a-time implementation, and decodes payloads with the protobuf runtime
from a descriptor of TensorFlow's `Event` messages (the writer encodes the
wire format by hand, so the two share no code). Where the `tensorboard`
package is installed, its own loader reads the file too.
"""

import os
import struct

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from srem_jax import tensorboard


def _event_classes():
  fdp = descriptor_pb2.FileDescriptorProto(
    name="srem_test_event.proto", package="srem_test", syntax="proto3"
  )
  F = descriptor_pb2.FieldDescriptorProto

  def message(name, fields):
    msg = fdp.message_type.add(name=name)
    for field_name, number, kind, label, type_name in fields:
      field = msg.field.add(name=field_name, number=number, type=kind, label=label)
      if type_name:
        field.type_name = type_name

  one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
  message(
    "HistogramProto",
    [
      ("min", 1, F.TYPE_DOUBLE, one, ""),
      ("max", 2, F.TYPE_DOUBLE, one, ""),
      ("num", 3, F.TYPE_DOUBLE, one, ""),
      ("sum", 4, F.TYPE_DOUBLE, one, ""),
      ("sum_squares", 5, F.TYPE_DOUBLE, one, ""),
      ("bucket_limit", 6, F.TYPE_DOUBLE, many, ""),
      ("bucket", 7, F.TYPE_DOUBLE, many, ""),
    ],
  )
  message(
    "Value",
    [
      ("tag", 1, F.TYPE_STRING, one, ""),
      ("simple_value", 2, F.TYPE_FLOAT, one, ""),
      ("histo", 5, F.TYPE_MESSAGE, one, ".srem_test.HistogramProto"),
    ],
  )
  message("Summary", [("value", 1, F.TYPE_MESSAGE, many, ".srem_test.Value")])
  message(
    "Event",
    [
      ("wall_time", 1, F.TYPE_DOUBLE, one, ""),
      ("step", 2, F.TYPE_INT64, one, ""),
      ("file_version", 3, F.TYPE_STRING, one, ""),
      ("summary", 5, F.TYPE_MESSAGE, one, ".srem_test.Summary"),
    ],
  )
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("srem_test.Event"))


Event = _event_classes()


def _crc32c_bitwise(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path):
  data = open(path, "rb").read()
  events, pos = [], 0
  while pos < len(data):
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    assert header_crc == _masked(_crc32c_bitwise(header))
    payload = data[pos + 12 : pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
    assert payload_crc == _masked(_crc32c_bitwise(payload))
    events.append(Event.FromString(payload))
    pos += 16 + length
  assert pos == len(data)
  return events


def test_crc32c_matches_the_standard_check_value():
  # RFC 3720's check value for CRC-32C of the ASCII digits 1..9.
  assert tensorboard.crc32c(b"123456789") == 0xE3069283
  assert _crc32c_bitwise(b"123456789") == 0xE3069283


def test_scalars_and_histogram_read_back(tmp_path):
  writer = tensorboard.SummaryWriter(str(tmp_path))
  writer.scalar("train/loss", 1.25, step=10)
  writer.scalar("val/rsum", 312.5, step=10)
  writer.scalar("train/loss", -0.5, step=2**40)
  values = np.array([0.0, 1.0, 1.5, 2.0, 4.0])
  writer.flush()
  writer.histogram("energy", values, step=3, bins=4)
  writer.close()
  assert os.path.basename(writer.path).startswith("events.out.tfevents.")
  assert os.path.dirname(writer.path) == str(tmp_path)
  events = read_events(writer.path)
  assert events[0].file_version == "brain.Event:2"
  scalars = [
    (e.step, v.tag, v.simple_value) for e in events[1:4] for v in e.summary.value
  ]
  assert scalars == [
    (10, "train/loss", 1.25),
    (10, "val/rsum", 312.5),
    (2**40, "train/loss", -0.5),
  ]
  (histo_value,) = events[4].summary.value
  histo = histo_value.histo
  assert (events[4].step, histo_value.tag) == (3, "energy")
  assert (histo.min, histo.max, histo.num) == (0.0, 4.0, 5.0)
  assert histo.sum == 8.5 and histo.sum_squares == 0 + 1 + 2.25 + 4 + 16
  assert list(histo.bucket_limit) == [1.0, 2.0, 3.0, 4.0]
  # np.histogram's bins are [0,1), [1,2), [2,3), [3,4].
  assert list(histo.bucket) == [1.0, 2.0, 1.0, 1.0]


def test_log_epoch_writes_numeric_fields_under_split(tmp_path):
  writer = tensorboard.SummaryWriter(str(tmp_path))
  tensorboard.log_epoch(
    writer,
    [
      {
        "step": 7,
        "epoch": 1,
        "split": "train",
        "warmup": True,
        "loss": np.float32(0.75),
        "energy_noisy": float("nan"),
      },
      {"step": 7, "epoch": 1, "split": "val", "rsum": 100.0, "i2t_r1": 12},
    ],
  )
  tensorboard.log_epoch(None, [{"step": 1, "split": "train", "loss": 1.0}])
  events = read_events(writer.path)
  tags = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value}
  assert tags == {
    (7, "train/loss"): 0.75,
    (7, "val/rsum"): 100.0,
    (7, "val/i2t_r1"): 12,
  }


def test_tensorboard_itself_reads_the_file(tmp_path):
  loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
  writer = tensorboard.SummaryWriter(str(tmp_path))
  writer.scalar("val/rsum", 42.0, step=5)
  writer.close()
  events = list(loader.LegacyEventFileLoader(writer.path).Load())
  assert events[1].step == 5
  assert events[1].summary.value[0].tag == "val/rsum"
  assert events[1].summary.value[0].simple_value == 42.0
