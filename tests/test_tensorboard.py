"""Event files read back by TensorBoard's own loader and, independently of
tensorboardX's writer, by a reader of the TFRecord framing (tests/events.py):
tags, steps and values of scalars, histograms, images, text and hparams."""

import io
import json
import os
import types

import events
import ml_collections
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import plugin_hparams_pb2

from srem_jax.report import tensorboard


@pytest.fixture(params=["tensorboard", "framing"])
def reader(request):
  """`read(path)` gives an event file's Events; `hparams_data` parses the
  hparams plugin's content with the same package's classes."""
  if request.param == "framing":
    return types.SimpleNamespace(
      read=events.read_framed, hparams_data=plugin_hparams_pb2.HParamsPluginData
    )
  if not events.tensorboard_installed():
    pytest.skip("tensorboard is not installed")
  from tensorboard.plugins.hparams import plugin_data_pb2

  return types.SimpleNamespace(
    read=events.read_with_tensorboard, hparams_data=plugin_data_pb2.HParamsPluginData
  )


def read_dir(reader, logdir):
  (path,) = events.event_files(logdir)
  return reader.read(path)


def png(width, height, mode="RGBA") -> bytes:
  picture = Image.new(mode, (width, height), color=(10, 200, 30, 255)[: len(mode)])
  out = io.BytesIO()
  picture.save(out, format="PNG")
  return out.getvalue()


def small_config():
  return ml_collections.ConfigDict(
    {
      "name": "demo",
      "train": {"lr": 2e-4, "epochs": 3, "seed": None},
      "loss": {"name": "srem", "use_cmbcl": True, "beta": 0.7},
      "mesh": {"shape": (1, 2)},
    }
  )


def test_the_framing_readers_crc_matches_the_standard_check_value():
  # RFC 3720's check value for CRC-32C of the ASCII digits 1..9.
  assert events.crc32c(b"123456789") == 0xE3069283


def test_scalars_read_back(tmp_path, reader):
  writer = tensorboard.SummaryWriter(str(tmp_path))
  writer.scalar("train/loss", 1.25, step=10)
  writer.scalar("val/rsum", 312.5, step=10)
  writer.flush()
  writer.scalar("train/loss", -0.5, step=2**40)
  writer.close()
  (path,) = events.event_files(tmp_path)
  assert os.path.dirname(path) == str(tmp_path)
  read = reader.read(path)
  assert read[0].file_version == "brain.Event:2"
  scalars = [(step, v.tag, v.simple_value) for step, v in events.values(read)]
  assert scalars == [
    (10, "train/loss", 1.25),
    (10, "val/rsum", 312.5),
    (2**40, "train/loss", -0.5),
  ]


def test_histogram_bins_counts_and_moments(tmp_path, reader):
  writer = tensorboard.SummaryWriter(str(tmp_path))
  writer.histogram("energy", [0.0, 1.0, 1.5, 2.0, 4.0, np.nan, np.inf], step=3, bins=4)
  writer.histogram("only_nan", [np.nan], step=3)
  writer.close()
  ((step, value),) = events.values(read_dir(reader, tmp_path))
  histo = value.histo
  assert (step, value.tag) == (3, "energy")
  # The non-finite values are left out of every field.
  assert (histo.min, histo.max, histo.num) == (0.0, 4.0, 5.0)
  assert histo.sum == 8.5 and histo.sum_squares == 0 + 1 + 2.25 + 4 + 16
  # Bucket i counts values in (limit[i-1], limit[i]]; an empty first bucket
  # with limit 0 = min opens the range. Four equal bins of [0, 4]:
  # [0,1) holds 0, [1,2) holds 1 and 1.5, [2,3) holds 2, [3,4] holds 4.
  assert list(histo.bucket_limit) == [0.0, 1.0, 2.0, 3.0, 4.0]
  assert list(histo.bucket) == [0.0, 1.0, 2.0, 1.0, 1.0]


def test_image_is_the_png_unchanged(tmp_path, reader):
  picture = png(7, 5)
  writer = tensorboard.SummaryWriter(str(tmp_path))
  writer.image("plots/loss", picture, step=4)
  writer.image("plots/gray", png(3, 2, mode="L"), step=4)
  writer.close()
  (step, rgba), (_, gray) = events.values(read_dir(reader, tmp_path))
  assert (step, rgba.tag) == (4, "plots/loss")
  assert (rgba.image.width, rgba.image.height, rgba.image.colorspace) == (7, 5, 4)
  assert rgba.image.encoded_image_string == picture
  decoded = np.asarray(Image.open(io.BytesIO(rgba.image.encoded_image_string)))
  assert decoded.shape == (5, 7, 4) and (decoded == (10, 200, 30, 255)).all()
  assert (gray.image.width, gray.image.height, gray.image.colorspace) == (3, 2, 1)


def test_config_is_written_once_as_text(tmp_path, reader):
  writer = tensorboard.SummaryWriter(str(tmp_path))
  tensorboard.log_config(writer, small_config(), step=0)
  tensorboard.log_config(None, small_config(), step=0)
  writer.close()
  ((step, value),) = events.values(read_dir(reader, tmp_path))
  assert (step, value.tag) == (0, "config/text_summary")
  assert value.metadata.plugin_data.plugin_name == "text"
  (markdown,) = value.tensor.string_val
  lines = markdown.decode().splitlines()
  assert all(line.startswith("    ") for line in lines)  # a markdown code block
  parsed = json.loads("\n".join(line[4:] for line in lines))
  expected = small_config().to_dict()
  expected["mesh"]["shape"] = [1, 2]
  assert parsed == expected


def _hparams_parts(reader, pairs):
  parts = {}
  for _, value in pairs:
    if value.metadata.plugin_data.plugin_name == "hparams":
      content = value.metadata.plugin_data.content
      parts[value.tag] = reader.hparams_data.FromString(content)
  return parts


def test_final_test_metrics_are_an_hparams_session(tmp_path, reader):
  writer = tensorboard.SummaryWriter(str(tmp_path))
  test = {"rsum": 301.5, "i2t_r1": 40.0, "i2t_medr": float("nan"), "split": "x"}
  tensorboard.log_test(writer, small_config(), test, step=90)
  writer.close()
  pairs = events.values(read_dir(reader, tmp_path))
  scalars = {(s, v.tag): v.simple_value for s, v in pairs if v.HasField("simple_value")}
  assert scalars == {(90, "test/rsum"): 301.5, (90, "test/i2t_r1"): 40.0}
  parts = _hparams_parts(reader, pairs)
  assert set(parts) == {
    "_hparams_/experiment",
    "_hparams_/session_start_info",
    "_hparams_/session_end_info",
  }
  experiment = parts["_hparams_/experiment"].experiment
  assert {m.name.tag for m in experiment.metric_infos} == {"test/rsum", "test/i2t_r1"}
  # Every config field but the unset seed, flattened with dots.
  names = {h.name for h in experiment.hparam_infos}
  assert names == {
    "name",
    "train.lr",
    "train.epochs",
    "loss.name",
    "loss.use_cmbcl",
    "loss.beta",
    "mesh.shape",
  }
  start = parts["_hparams_/session_start_info"].session_start_info.hparams
  assert start["name"].string_value == "demo"
  assert start["train.lr"].number_value == 2e-4
  assert start["train.epochs"].number_value == 3
  assert start["loss.use_cmbcl"].bool_value is True
  assert start["mesh.shape"].string_value == "(1, 2)"
  end = parts["_hparams_/session_end_info"].session_end_info
  assert end.status == 1  # STATUS_SUCCESS


def test_coco_protocol_metrics_are_flattened(tmp_path, reader):
  writer = tensorboard.SummaryWriter(str(tmp_path))
  test = {"coco1k": {"rsum": 500.0}, "coco5k": {"rsum": 400.0}}
  tensorboard.log_test(writer, small_config(), test, step=7)
  writer.close()
  pairs = events.values(read_dir(reader, tmp_path))
  scalars = {v.tag: v.simple_value for _, v in pairs if v.HasField("simple_value")}
  assert scalars == {"test/coco1k/rsum": 500.0, "test/coco5k/rsum": 400.0}


def test_log_epoch_writes_scalars_histograms_and_figures(tmp_path, reader):
  logdir, plots_dir = tmp_path / "tb", tmp_path / "plots"
  plots_dir.mkdir()
  figures = []
  for name, size in (("loss", (6, 4)), ("selection", (3, 8))):
    (plots_dir / f"{name}.png").write_bytes(png(*size))
    figures.append(str(plots_dir / f"{name}.png"))
  energy = np.array([-3.0, -2.5, -1.0, -0.5, np.nan])
  entropy = np.array([0.1, 0.2, 0.9, 1.0, 0.3])
  truth = np.array([True, True, False, False, True])
  writer = tensorboard.SummaryWriter(str(logdir))
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
    {"energy": energy, "entropy": entropy, "truly_clean": truth},
    figures,
  )
  # A noise-free epoch has no truly noisy pairs, hence no histogram of them.
  tensorboard.log_epoch(
    writer,
    [{"step": 14, "epoch": 2, "split": "train", "loss": 0.5}],
    {"energy": energy[:2], "entropy": entropy[:2], "truly_clean": truth[:2]},
  )
  tensorboard.log_epoch(None, [{"step": 1, "split": "train", "loss": 1.0}])
  # log_epoch flushed: everything is in the file before the writer closes.
  pairs = events.values(read_dir(reader, logdir))
  writer.close()
  scalars = {(s, v.tag): v.simple_value for s, v in pairs if v.HasField("simple_value")}
  assert scalars == {
    (7, "train/loss"): 0.75,
    (7, "val/rsum"): 100.0,
    (7, "val/i2t_r1"): 12,
    (14, "train/loss"): 0.5,
  }
  histos = {(s, v.tag): v.histo for s, v in pairs if v.HasField("histo")}
  assert sorted(histos) == [
    (7, "pairs/energy_truly_clean"),
    (7, "pairs/energy_truly_noisy"),
    (7, "pairs/entropy_truly_clean"),
    (7, "pairs/entropy_truly_noisy"),
    (14, "pairs/energy_truly_clean"),
    (14, "pairs/entropy_truly_clean"),
  ]
  clean_energy = histos[7, "pairs/energy_truly_clean"]
  assert (clean_energy.num, clean_energy.sum) == (2, -5.5)  # the NaN is left out
  assert histos[7, "pairs/entropy_truly_clean"].num == 3
  noisy = histos[7, "pairs/entropy_truly_noisy"]
  assert (noisy.num, noisy.min, noisy.max) == (2, 0.9, 1.0)
  images = {(s, v.tag): v.image for s, v in pairs if v.HasField("image")}
  assert sorted(images) == [(7, "plots/loss"), (7, "plots/selection")]
  assert images[7, "plots/selection"].encoded_image_string == png(3, 8)
  assert (images[7, "plots/selection"].width, images[7, "plots/selection"].height) == (
    3,
    8,
  )


def test_two_writers_of_one_second_keep_separate_files(tmp_path, reader):
  first = tensorboard.SummaryWriter(str(tmp_path))
  second = tensorboard.SummaryWriter(str(tmp_path))
  first.scalar("a", 1.0, step=1)
  second.scalar("b", 2.0, step=1)
  first.close()
  second.close()
  files = events.event_files(tmp_path)
  assert len(files) == 2
  tags = sorted(v.tag for path in files for _, v in events.values(reader.read(path)))
  assert tags == ["a", "b"]


def test_bucket_object_is_rewritten_whole_on_each_flush(tmp_path):
  # The URL path's file object, here on a local path: a bucket object holds,
  # after each flush, everything written so far, once.
  path = tmp_path / "object"
  target = tensorboard._BucketObjects().open(str(path))
  target.write(b"abc")
  target.flush()
  assert path.read_bytes() == b"abc"
  target.write(b"de")
  target.close()
  assert path.read_bytes() == b"abcde"


def test_tensorboard_dashboards_find_every_kind(tmp_path):
  """TensorBoard's accumulator files each summary under its dashboard, and
  its hparams plugin parses the session."""
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.plugins.hparams import metadata

  writer = tensorboard.SummaryWriter(str(tmp_path))
  tensorboard.log_config(writer, small_config(), step=0)
  writer.scalar("val/rsum", 42.0, step=5)
  writer.histogram("pairs/energy_truly_clean", [1.0, 2.0, 3.0], step=5)
  writer.image("plots/loss", png(4, 4), step=5)
  tensorboard.log_test(writer, small_config(), {"rsum": 9.0}, step=6)
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"images": 0})
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("val/rsum")] == [(5, 42.0)]
  assert [(e.step, e.value) for e in acc.Scalars("test/rsum")] == [(6, 9.0)]
  (histo,) = acc.Histograms("pairs/energy_truly_clean")
  assert (histo.step, histo.histogram_value.num) == (5, 3)
  (image,) = acc.Images("plots/loss")
  assert (image.step, image.width, image.height) == (5, 4, 4)
  assert acc.PluginTagToContent("text").keys() == {"config/text_summary"}
  hparams = acc.PluginTagToContent("hparams")
  start = metadata.parse_session_start_info_plugin_data(
    hparams["_hparams_/session_start_info"]
  )
  assert start.hparams["loss.name"].string_value == "srem"
  experiment = metadata.parse_experiment_plugin_data(hparams["_hparams_/experiment"])
  assert [m.name.tag for m in experiment.metric_infos] == ["test/rsum"]
