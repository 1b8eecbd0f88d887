"""Command that builds a vocabulary JSON for a new dataset (docs/method.md §Data).

Counts tokens over the train and dev captions of `<raw_dir>/<name>/` and keeps
words seen at least `--min_count` times. Only for datasets without a vocab
file: the published F30K/COCO/CC152K vocabularies must be reused as they are,
so this never replaces an existing file.

    python -m srem_jax.data.build_vocab --raw_dir data --name my_precomp
"""

import sys

from absl import app, flags

from srem_jax.data import layout, tokenizer
from srem_jax.errors import UserError

_COUNTED_SPLITS = ("train", "dev")


def build_vocab_file(raw_dir: str, name: str, out: str = "", min_count: int = 4) -> str:
  """Writes the vocabulary of `name` to `out` (default location if empty)."""
  if min_count < 1:
    raise UserError(f"--min_count: expected a positive integer, got {min_count}")
  path = layout.resolve_vocab_path(raw_dir, name, out)
  captions = []
  for split in _COUNTED_SPLITS:
    captions += layout.read_split(raw_dir, name, split, check_finite=False).captions
  tokenizer.build_vocab(captions, min_count=min_count).save(path)
  return path


def _define_flags() -> None:
  flags.DEFINE_string("raw_dir", None, "Folder that holds <name>/.", required=True)
  flags.DEFINE_string(
    "name", None, "Dataset folder name, e.g. my_precomp.", required=True
  )
  flags.DEFINE_string(
    "out", "", "Output JSON; default <raw_dir>/vocab/<name>_vocab.json."
  )
  flags.DEFINE_integer("min_count", 4, "Keep words seen at least this often.")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  try:
    path = build_vocab_file(f.raw_dir, f.name, f.out, f.min_count)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {path}: {len(tokenizer.Vocab.load(path))} words")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
