"""Caption tokenizer and vocabulary, compatible with the SCAN/NCR vocab files.

Owns `word_tokenize` (what `nltk.word_tokenize(caption.lower())` returns, as
the SCAN/NCR vocabularies were built), the `Vocab` read from / written to the
users' `<name>_vocab.json`, and `build_vocab` for new datasets.

    vocab = Vocab.load("data/vocab/f30k_precomp_vocab.json")
    ids = vocab.encode("A man riding a horse.")  # [1, ..., 2] int32
"""

import collections
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping

import numpy as np

from srem_jax.errors import UserError

# ---- sentence splitting -----------------------------------------------------
# `nltk.word_tokenize` first cuts the text into sentences with punkt, so a
# period that ends a word in the middle of a caption ("a man. he runs") becomes
# its own token. Punkt's model is downloaded data (`nltk.download("punkt_tab")`)
# and is used when installed. Without it this splitter stands in: it cuts after
# a word ending in a period, except after abbreviations, initials, numbers and
# words with inner periods ("l.a.", "u.s.a.", "e.g."), which punkt keeps whole
# on lower-cased text (its orthographic test never sees a lower-case next word
# as a sentence start).
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs etc".split())
_PERIOD_END = re.compile(r"^(?P<word>.*[^.])\.[\"')\]}»”’]*$")
_LEADING_PUNCT = re.compile(r"^[(\"`{\[:;&#*@)}\]\-,]+")
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.\-]*$")
_INITIAL = re.compile(r"^[^\W\d]$")


def _ends_sentence(chunk: str) -> bool:
  match = _PERIOD_END.match(chunk)
  if match is None:
    return False
  word = _LEADING_PUNCT.sub("", match.group("word"))
  if not word or "." in word or _NUMBER.match(word) or _INITIAL.match(word):
    return False
  return word not in _ABBREVIATIONS and word.split("-")[-1] not in _ABBREVIATIONS


def _split_without_punkt(text: str) -> list[str]:
  chunks = text.split()
  sentences, current = [], []
  for position, chunk in enumerate(chunks):
    current.append(chunk)
    if position + 1 < len(chunks) and _ends_sentence(chunk):
      sentences.append(" ".join(current))
      current = []
  if current:
    sentences.append(" ".join(current))
  return sentences


@functools.cache
def _nltk():
  """NLTK's word tokenizer and sentence splitter; imported on first use (~1 s)."""
  import nltk.tokenize

  if nltk.tokenize.punkt_model_available("english"):
    split = nltk.tokenize.sent_tokenize
  else:
    split = _split_without_punkt
  return nltk.tokenize.NLTKWordTokenizer(), split


def word_tokenize(text: str) -> list[str]:
  """Lower-cased tokens as `nltk.word_tokenize(text.lower())` gives them.

  Exactly so when punkt's model is installed; otherwise the sentences come
  from `_split_without_punkt` and each is tokenized by NLTK's word tokenizer.
  """
  words, split_sentences = _nltk()
  return [
    token
    for sentence in split_sentences(text.lower())
    for token in words.tokenize(sentence)
  ]


# ---- vocabulary ---------------------------------------------------------------
_SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")


class Vocab:
  """Word <-> id maps with the four special tokens at ids 0..3."""

  PAD, START, END, UNK = 0, 1, 2, 3

  def __init__(self, word2idx: Mapping[str, int], source: str = "vocab"):
    # A missing special also leaves a gap in the ids; its name says more.
    for expected_id, special in enumerate(_SPECIALS):
      if special not in word2idx:
        raise UserError(
          f"{source}: no {special!r} entry (expected at id {expected_id})"
        )
    ids = sorted(word2idx.values())
    if ids != list(range(len(ids))):
      raise UserError(f"{source}: word ids must be exactly 0..{len(ids) - 1}")
    for expected_id, special in enumerate(_SPECIALS):
      if word2idx[special] != expected_id:
        raise UserError(
          f"{source}: expected {special!r} at id {expected_id}, "
          f"got {word2idx[special]!r}"
        )
    self.word2idx: dict[str, int] = dict(word2idx)
    self.idx2word: dict[int, str] = {i: w for w, i in self.word2idx.items()}

  @classmethod
  def load(cls, path: str) -> "Vocab":
    """Reads the SCAN/NCR JSON (`word2idx`, `idx2word`, `idx`) and validates it."""
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except FileNotFoundError:
      raise UserError(f"{path}: vocabulary file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UserError(f"{path}: not a readable JSON vocabulary ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("word2idx"), dict):
      raise UserError(f"{path}: expected a JSON object with key 'word2idx'")
    word2idx = data["word2idx"]
    if not all(isinstance(i, int) for i in word2idx.values()):
      raise UserError(f"{path}: word2idx values must be integers")
    vocab = cls(word2idx, source=path)
    idx2word = data.get("idx2word")
    if idx2word is not None:
      try:
        as_ints = {int(i): w for i, w in idx2word.items()}
      except (AttributeError, ValueError):
        raise UserError(f"{path}: idx2word keys must be integer ids") from None
      if as_ints != vocab.idx2word:
        raise UserError(f"{path}: idx2word is not the inverse of word2idx")
    if "idx" in data and data["idx"] != len(vocab):
      raise UserError(f"{path}: 'idx' is {data['idx']}, expected {len(vocab)}")
    return vocab

  def save(self, path: str) -> None:
    """Writes the same JSON format; never replaces an existing file."""
    parent = os.path.dirname(path)
    if parent:
      os.makedirs(parent, exist_ok=True)
    data = {
      "word2idx": self.word2idx,
      "idx2word": {str(i): w for i, w in sorted(self.idx2word.items())},
      "idx": len(self),
    }
    try:
      with open(path, "x", encoding="utf-8") as f:
        json.dump(data, f)
    except FileExistsError:
      raise UserError(f"{path}: already exists; refusing to overwrite it") from None

  def __len__(self) -> int:
    return len(self.word2idx)

  def encode(self, caption: str) -> np.ndarray:
    """int32 ids of `<start> tokens <end>`; unknown words map to `<unk>`."""
    ids = [self.word2idx.get(token, self.UNK) for token in word_tokenize(caption)]
    return np.asarray([self.START, *ids, self.END], dtype=np.int32)


def build_vocab(captions: Iterable[str], min_count: int = 4) -> Vocab:
  """Words seen at least `min_count` times, most frequent first, ties by spelling."""
  counts = collections.Counter()
  for caption in captions:
    counts.update(word_tokenize(caption))
  kept = [w for w, c in counts.items() if c >= min_count and w not in _SPECIALS]
  kept.sort(key=lambda w: (-counts[w], w))
  return Vocab({word: i for i, word in enumerate([*_SPECIALS, *kept])})
