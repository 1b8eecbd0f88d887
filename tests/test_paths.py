"""Workdir paths: URLs pass through untouched, local paths become absolute."""

import json
import os

from srem_jax import paths
from srem_jax.report.reporting import Reporter


def test_bucket_url_is_left_intact():
  assert paths.is_url("gs://bucket/x")
  assert paths.absolute("gs://bucket/x") == "gs://bucket/x"
  assert str(paths.as_path("gs://bucket/x")) == "gs://bucket/x"
  assert (
    str(paths.as_path("gs://bucket/x") / "checkpoints") == "gs://bucket/x/checkpoints"
  )


def test_local_path_becomes_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert not paths.is_url("runs/demo")
  assert paths.absolute("runs/demo") == os.path.join(str(tmp_path), "runs", "demo")
  assert str(paths.as_path("runs/demo")) == os.path.join(str(tmp_path), "runs", "demo")


def test_reporter_appends_lines_and_replaces_json(tmp_path):
  report = Reporter(str(tmp_path))
  report.write({"step": 1, "loss": float("nan")})
  report.write({"step": 2, "loss": 0.5})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
    {"step": 1, "loss": "nan"},
    {"step": 2, "loss": 0.5},
  ]
  report.write_json("results.json", {"a": 1})
  path = report.write_json("results.json", {"a": 2})
  assert path == str(tmp_path / "results.json")
  assert json.loads((tmp_path / "results.json").read_text()) == {"a": 2}
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "results.json"]
