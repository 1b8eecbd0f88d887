"""Tokenizer against hand-written NLTK word_tokenize outputs and NLTK's word
tokenizer on hand-split sentences; Vocab JSON round trip."""

import json

import nltk
import numpy as np
import pytest
from nltk.tokenize import NLTKWordTokenizer

from srem_jax.data import build_vocab, tokenizer
from srem_jax.data.tokenizer import Vocab
from srem_jax.errors import UserError

# Expected lists are what `nltk.word_tokenize(caption.lower())` returns.
CAPTIONS = [
  (
    "A man in a red t-shirt is riding a bike.",
    ["a", "man", "in", "a", "red", "t-shirt", "is", "riding", "a", "bike", "."],
  ),
  (
    "Two dogs don't play; they're sleeping.",
    ["two", "dogs", "do", "n't", "play", ";", "they", "'re", "sleeping", "."],
  ),
  (
    "It's a sunny day, and the children can't wait!",
    [
      "it",
      "'s",
      "a",
      "sunny",
      "day",
      ",",
      "and",
      "the",
      "children",
      "ca",
      "n't",
      "wait",
      "!",
    ],
  ),
  (
    'A sign that says "STOP" next to a road.',
    ["a", "sign", "that", "says", "``", "stop", "''", "next", "to", "a", "road", "."],
  ),
  (
    "The woman (wearing glasses) holds 3.5 pounds of fish.",
    [
      "the",
      "woman",
      "(",
      "wearing",
      "glasses",
      ")",
      "holds",
      "3.5",
      "pounds",
      "of",
      "fish",
      ".",
    ],
  ),
  (
    "Over 1,000 people at the marathon: runners and fans.",
    [
      "over",
      "1,000",
      "people",
      "at",
      "the",
      "marathon",
      ":",
      "runners",
      "and",
      "fans",
      ".",
    ],
  ),
  ("Is this a cat?", ["is", "this", "a", "cat", "?"]),
  (
    "A man's dog and the kids' toys",
    ["a", "man", "'s", "dog", "and", "the", "kids", "'", "toys"],
  ),
  (
    "A dog jumps... over the fence",
    ["a", "dog", "jumps", "...", "over", "the", "fence"],
  ),
  (
    "They cannot see the $5 bill & coins",
    ["they", "can", "not", "see", "the", "$", "5", "bill", "&", "coins"],
  ),
  (
    "A man. He is running down the street.",
    ["a", "man", ".", "he", "is", "running", "down", "the", "street", "."],
  ),
  (
    "Children gonna play at 12:30 pm",
    ["children", "gon", "na", "play", "at", "12:30", "pm"],
  ),
  (
    "A woman -- smiling -- holds an umbrella.",
    ["a", "woman", "--", "smiling", "--", "holds", "an", "umbrella", "."],
  ),
  ("A cat sits on a mat .", ["a", "cat", "sits", "on", "a", "mat", "."]),
  (
    "a man wearing a hat, sunglasses and a jacket",
    ["a", "man", "wearing", "a", "hat", ",", "sunglasses", "and", "a", "jacket"],
  ),
  ("'hello' says the parrot", ["'", "hello", "'", "says", "the", "parrot"]),
  (
    "I'm sure you'll like what we've done, wouldn't you?",
    [
      "i",
      "'m",
      "sure",
      "you",
      "'ll",
      "like",
      "what",
      "we",
      "'ve",
      "done",
      ",",
      "would",
      "n't",
      "you",
      "?",
    ],
  ),
  ('The sign reads "open."', ["the", "sign", "reads", "``", "open", ".", "''"]),
  ("Mr. Smith walks his dog.", ["mr.", "smith", "walks", "his", "dog", "."]),
]


@pytest.mark.parametrize("caption,expected", CAPTIONS)
def test_word_tokenize_matches_nltk(caption, expected):
  assert tokenizer.word_tokenize(caption) == expected


def test_build_vocab_order_and_threshold():
  captions = ["b b a", "a b c", "a b", "c c a", "a d"]  # a:5 b:5 c:3 d:1
  vocab = tokenizer.build_vocab(captions, min_count=3)
  words = [vocab.idx2word[i] for i in range(len(vocab))]
  assert words == ["<pad>", "<start>", "<end>", "<unk>", "a", "b", "c"]


def test_encode_wraps_and_maps_unknown_words():
  vocab = tokenizer.build_vocab(["a dog runs."] * 4)
  ids = vocab.encode("A cat runs.")
  assert ids.dtype == np.int32
  w = vocab.word2idx
  expected = [1, w["a"], 3, w["runs"], w["."], 2]
  np.testing.assert_array_equal(ids, expected)


def test_save_load_round_trip_in_scan_format(tmp_path):
  vocab = tokenizer.build_vocab(["a dog runs."] * 4)
  path = str(tmp_path / "v" / "x_vocab.json")
  vocab.save(path)
  with open(path) as f:
    data = json.load(f)
  assert set(data) == {"word2idx", "idx2word", "idx"}
  assert data["idx"] == len(vocab) == 8
  assert data["idx2word"]["3"] == "<unk>"
  loaded = tokenizer.Vocab.load(path)
  assert loaded.word2idx == vocab.word2idx
  assert loaded.idx2word == vocab.idx2word
  with pytest.raises(UserError, match="refusing to overwrite"):
    vocab.save(path)


def _write(path, data):
  path.write_text(json.dumps(data))
  return str(path)


@pytest.mark.parametrize(
  "data,message",
  [
    (
      {"word2idx": {"<start>": 0, "<pad>": 1, "<end>": 2, "<unk>": 3}},
      "'<pad>' at id 0",
    ),
    (
      {"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 5}},
      r"exactly 0\.\.3",
    ),
    ({"idx2word": {}}, "'word2idx'"),
    (
      {
        "word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3},
        "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "dog"},
      },
      "inverse",
    ),
    (
      {"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}, "idx": 7},
      "'idx' is 7",
    ),
  ],
)
def test_load_rejects_malformed_vocab(tmp_path, data, message):
  path = _write(tmp_path / "v.json", data)
  with pytest.raises(UserError, match=message):
    tokenizer.Vocab.load(path)


def test_load_reports_missing_and_broken_files(tmp_path):
  with pytest.raises(UserError, match="not found"):
    tokenizer.Vocab.load(str(tmp_path / "nope.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(UserError, match="bad.json: not a readable JSON"):
    tokenizer.Vocab.load(str(bad))


def test_build_vocab_file_counts_train_and_dev_only(tmp_path):
  folder = tmp_path / "toy_precomp"
  folder.mkdir()
  splits = {"train": ["a red dog."] * 3, "dev": ["a dog"] * 2, "test": ["a cat"] * 9}
  for split, captions in splits.items():
    np.save(folder / f"{split}_ims.npy", np.zeros((len(captions), 2, 3), np.float32))
    (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
  path = build_vocab.build_vocab_file(str(tmp_path), "toy_precomp", min_count=4)
  assert path == str(tmp_path / "vocab" / "toy_precomp_vocab.json")
  words = tokenizer.Vocab.load(path).word2idx
  assert list(words)[4:] == ["a", "dog"]  # counts 5 and 5; "red" and "." only 3
  with pytest.raises(UserError, match="refusing to overwrite"):
    build_vocab.build_vocab_file(str(tmp_path), "toy_precomp")


# Real-looking captions with the sentences punkt cuts the lower-cased text into,
# written out by hand so the reference does not depend on our splitter.
SENTENCES = [
  ("It's 5:30 p.m. and the sun's setting", ["it's 5:30 p.m. and the sun's setting"]),
  (
    "Three kids (two boys and a girl) play in the 2-foot-deep pool!",
    ["three kids (two boys and a girl) play in the 2-foot-deep pool!"],
  ),
  (
    "Workers can't stop, won't stop, shan't stop.",
    ["workers can't stop, won't stop, shan't stop."],
  ),
  ("A 3.5-inch screen shows 1,000 photos.", ["a 3.5-inch screen shows 1,000 photos."]),
  ("Rock 'n' roll band on stage", ["rock 'n' roll band on stage"]),
  (
    'A man holds a sign: "I\'m hungry." People walk by.',
    ['a man holds a sign: "i\'m hungry."', "people walk by."],
  ),
  (
    "Two girls. They're laughing; one wears a 'cool' hat.",
    ["two girls.", "they're laughing; one wears a 'cool' hat."],
  ),
  (
    "Dr. Jones (in the white coat) talks to the kids... They listen.",
    ["dr. jones (in the white coat) talks to the kids... they listen."],
  ),
  (
    "A DOG ISN'T BARKING. IT'S ASLEEP ON THE COUCH",
    ["a dog isn't barking.", "it's asleep on the couch"],
  ),
  (
    "A woman in a “red” dress — smiling — waves at noon. We'll see.",
    ["a woman in a “red” dress — smiling — waves at noon.", "we'll see."],
  ),
]


def nltk_tokens(sentences):
  reference = NLTKWordTokenizer()
  return [token for sentence in sentences for token in reference.tokenize(sentence)]


@pytest.mark.parametrize("caption,sentences", SENTENCES)
def test_equals_nltk_word_tokenizer_on_each_sentence(caption, sentences):
  tokens = tokenizer.word_tokenize(caption)
  assert tokens == nltk_tokens(sentences)
  assert all(token == token.lower() for token in tokens)


# A word with inner periods ends no sentence of lower-cased text for punkt, so
# NLTK's word tokenizer sees it mid-sentence and keeps its final period; only
# the caption's last period (or an ordinary word's) is split off.
INNER_PERIODS = [
  ("a man in l.a. walks his dog .", ["a man in l.a. walks his dog ."], "l.a."),
  ("The U.S.A. flag waves", ["the u.s.a. flag waves"], "u.s.a."),
  ("Dr. Smith and Mr. Jones", ["dr. smith and mr. jones"], "mr."),
  ("A sign reads e.g. stop.", ["a sign reads e.g. stop."], "e.g."),
  (
    "Tourists in Washington D.C. take photos",
    ["tourists in washington d.c. take photos"],
    "d.c.",
  ),
  ("A flag of the U.S.A.", ["a flag of the u.s.a."], "u.s.a"),
  (
    "Fans from the U.S.A. cheer. A band plays in L.A.",
    ["fans from the u.s.a. cheer.", "a band plays in l.a."],
    "u.s.a.",
  ),
]


@pytest.mark.parametrize("caption,sentences,kept", INNER_PERIODS)
def test_word_with_inner_periods_ends_no_sentence(caption, sentences, kept):
  tokens = tokenizer.word_tokenize(caption)
  assert tokens == nltk_tokens(sentences)
  assert kept in tokens


def test_single_sentence_captions_equal_nltk_word_tokenizer():
  for caption, _ in CAPTIONS:
    if ". " not in caption:
      expected = NLTKWordTokenizer().tokenize(caption.lower())
      assert tokenizer.word_tokenize(caption) == expected, caption


def test_encode_lower_cases_and_wraps_in_start_end():
  captions = [caption for caption, _ in SENTENCES]
  vocab = tokenizer.build_vocab(captions, min_count=1)
  for caption, sentences in SENTENCES:
    expected = [Vocab.START, *(vocab.word2idx[t] for t in nltk_tokens(sentences))]
    np.testing.assert_array_equal(vocab.encode(caption), [*expected, Vocab.END])
    np.testing.assert_array_equal(vocab.encode(caption.upper()), vocab.encode(caption))
  two, period = vocab.word2idx["two"], vocab.word2idx["."]
  np.testing.assert_array_equal(
    vocab.encode("Two ZEBRAS."), [Vocab.START, two, Vocab.UNK, period, Vocab.END]
  )


@pytest.fixture
def punkt_model(tmp_path, monkeypatch):
  """A punkt model that knows one abbreviation ("approx"), on NLTK's data path."""
  model = tmp_path / "tokenizers" / "punkt_tab" / "english"
  model.mkdir(parents=True)
  (model / "abbrev_types.txt").write_text("approx\n")
  for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
    (model / name).write_text("")
  monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
  tokenizer._nltk.cache_clear()
  yield
  nltk.tokenize._get_punkt_tokenizer.cache_clear()
  tokenizer._nltk.cache_clear()


def test_sentences_come_from_punkt_when_its_model_is_installed(punkt_model):
  tokens = tokenizer.word_tokenize("Approx. 5 dogs run. Mr. Smith walks.")
  # This model keeps "approx." whole and, unlike the built-in list, ends a
  # sentence after "mr.".
  assert tokens == [
    "approx.",
    "5",
    "dogs",
    "run",
    ".",
    "mr",
    ".",
    "smith",
    "walks",
    ".",
  ]
