"""Run folders that may be local paths or URLs such as `gs://bucket/run`.

`os.path.abspath("gs://b/x")` gives `<cwd>/gs:/b/x`; these helpers leave URLs
as they are and hand out `etils.epath.Path` objects, which read and write
local folders and buckets alike.

    workdir = paths.absolute("gs://bucket/srem/f30k")  # unchanged
    (paths.as_path(workdir) / "results.json").write_text("{}")
"""

import os

from etils import epath


def is_url(path) -> bool:
  return "://" in os.fspath(path)


def absolute(path) -> str:
  """An absolute local path, or the URL unchanged."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def as_path(path) -> epath.Path:
  return epath.Path(absolute(path))
