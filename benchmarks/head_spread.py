"""Where an SGR model's scores stop depending on the pair.

Loads a run's checkpoint (or, with --run=init, the initial parameters of the
config), embeds N images of a split and the first caption of each with the
model, then recomputes the SGR similarity head in float64 NumPy stage by
stage: the SCAN context, the local and global nodes, each graph-reasoning
step, the score. For every stage it prints the rms spread of that stage's
output over the N x N pairs, split into three parts that add up in squares:

- image: the part that is the same for every caption (the row mean),
- caption: the part that is the same for every image (the column mean),
- pair: what is left, the only part that can tell a caption's own image from
  another.

For each reasoning step it also prints how many of its units are positive
(alive) for node 0 on at least one pair, and on all of them. A head whose
units are dead passes no gradient; one whose nodes no longer depend on the
pair scores every pair alike. The recomputed scores are checked against the
model's own.

    python benchmarks/head_spread.py --config=configs/demo.py --run=WORKDIR
    python benchmarks/head_spread.py --config=configs/demo.py --run=init \
      --config.model.word_dim=300

The checkpoint's architecture comes from its training record; --config gives
the data and, for --run=init, the model.
"""

import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from srem_jax import checkpoint  # noqa: E402
from srem_jax.data import layout, tokenizer  # noqa: E402
from srem_jax.models.sgraf import SGRAF  # noqa: E402

_ARCHITECTURE = (
  "head",
  "img_dim",
  "embed_dim",
  "word_dim",
  "sim_dim",
  "sgr_steps",
  "smooth",
)
_CAPS_PER_IMAGE = 5


def spread(x: np.ndarray) -> tuple[float, float, float, float]:
  """rms (over pairs, summed over the last axis) of x (N, M[, D]) around its
  mean: in total, and its image, caption and pair parts."""
  x = np.asarray(x, np.float64)
  if x.ndim == 2:
    x = x[..., None]
  centred = x - x.mean(axis=(0, 1))
  image = centred.mean(axis=1, keepdims=True)
  caption = centred.mean(axis=0, keepdims=True)
  pair = centred - image - caption
  parts = (centred, image, caption, pair)
  return tuple(float(np.sqrt(np.square(p).sum(-1).mean())) for p in parts)


def _l2n(x):
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def _dense(x, layer):
  return x @ np.asarray(layer["kernel"], np.float64) + np.asarray(
    layer["bias"], np.float64
  )


def sgr_stages(pairs_params, local, img_glob, words, cap_glob, mask, smooth):
  """The SGR head of every image x every caption, in float64.

  Returns (stages, alive, scores): stages is a list of (name, (N, M[, D])
  array) with per-caption means over real words for the per-word stages;
  alive lists, per reasoning step, node 0's pre-activations (N, M, S).
  """
  local, img_glob, words, cap_glob = (
    np.asarray(a, np.float64) for a in (local, img_glob, words, cap_glob)
  )
  mask = np.asarray(mask, bool)
  real = mask.sum(1)[None, :, None]

  def word_mean(x):  # (N, M, L, D) -> (N, M, D)
    return (x * mask[None, :, :, None]).sum(2) / real

  attn = np.einsum("nre,cle->ncrl", local, words)
  attn = np.where(attn > 0, attn, 0.1 * attn) * mask[None, :, None, :]
  attn = smooth * _l2n(attn)
  attn = np.exp(attn - attn.max(axis=2, keepdims=True))
  attn /= attn.sum(axis=2, keepdims=True)
  context = _l2n(np.einsum("ncrl,nre->ncle", attn, local))
  local_nodes = _l2n(
    _dense((context - words[None]) ** 2, pairs_params["sim_tranloc_w"])
  )
  global_node = _l2n(
    _dense((img_glob[:, None] - cap_glob[None]) ** 2, pairs_params["sim_tranglo_w"])
  )
  stages = [
    ("context", word_mean(context)),
    ("local nodes", word_mean(local_nodes)),
    ("global node", global_node),
  ]
  nodes = np.concatenate([global_node[:, :, None], local_nodes], axis=2)
  node_mask = np.concatenate([np.ones((mask.shape[0], 1), bool), mask], axis=1)
  alive = []
  step = 0
  while f"SGR_module_{step}" in pairs_params:
    module = pairs_params[f"SGR_module_{step}"]
    query = _dense(nodes, module["graph_query_w"])
    key = _dense(nodes, module["graph_key_w"])
    logits = np.einsum("ncis,ncjs->ncij", query, key)
    logits = np.where(node_mask[None, :, None, :], logits, -np.inf)
    edges = np.exp(logits - logits.max(axis=-1, keepdims=True))
    edges /= edges.sum(axis=-1, keepdims=True)
    pre = np.einsum("ncij,ncjs->ncis", edges, _dense(nodes, module["sim_graph_w"]))
    nodes = np.maximum(pre, 0.0)
    alive.append(pre[:, :, 0])
    stages.append((f"SGR step {step}", nodes[:, :, 0]))
    step += 1
  logit = _dense(nodes[:, :, 0], pairs_params["sim_eval_w"])[..., 0]
  scores = 1.0 / (1.0 + np.exp(-logit))
  stages.append(("score", scores))
  return stages, alive, scores


def _split_inputs(config, vocab_size_check, split: str, n: int):
  """The first n images of `split` and the first caption of each, tokenised."""
  folder = os.path.join(config.data.raw_dir, config.data.name)
  ims_path = os.path.join(folder, f"{split}_ims.npy")
  caps_path = os.path.join(folder, f"{split}_caps.txt")
  for path in (ims_path, caps_path):
    if not os.path.exists(path):
      raise SystemExit(f"error: {path}: not found (expected the SCAN layout)")
  rows = np.load(ims_path, mmap_mode="r")
  with open(caps_path, encoding="utf-8") as f:
    captions = f.read().splitlines()
  per_row = len(captions) // rows.shape[0]  # 5 when one row per image, else 1
  stride = _CAPS_PER_IMAGE // per_row
  n = min(n, rows.shape[0] // stride)
  images = np.asarray(rows[: n * stride : stride], np.float32)
  vocab = tokenizer.Vocab.load(
    layout.resolve_vocab_path(config.data.raw_dir, config.data.name)
  )
  vocab_size_check(len(vocab))
  pieces = [vocab.encode(c) for c in captions[: n * _CAPS_PER_IMAGE : _CAPS_PER_IMAGE]]
  lengths = np.array([len(p) for p in pieces], np.int32)
  tokens = np.zeros((n, int(lengths.max())), np.int32)
  for i, piece in enumerate(pieces):
    tokens[i, : len(piece)] = piece
  return images, tokens, lengths


def report(model, variables, images, tokens, lengths) -> str:
  img = model.apply(variables, images, train=False, method=model.encode_images)
  cap = model.apply(
    variables, tokens, lengths, train=False, method=model.encode_captions
  )
  expected = np.asarray(
    model.apply(variables, img, cap, train=False, method=model.score)
  )
  stages, alive, scores = sgr_stages(
    jax.tree.map(np.asarray, variables["params"]["sim_enc"]["pairs"]),
    img.local,
    img.glob,
    cap.words,
    cap.glob,
    cap.mask,
    model.smooth,
  )
  error = float(np.abs(scores - expected).max())
  lines = [f"{'stage':14s} {'total':>9s} {'image':>9s} {'caption':>9s} {'pair':>9s}"]
  for name, value in stages:
    lines.append(f"{name:14s} " + " ".join(f"{v:9.3g}" for v in spread(value)))
  for step, pre in enumerate(alive):
    positive = pre > 0
    lines.append(
      f"SGR step {step}: node-0 units alive on some pair "
      f"{int(positive.any(axis=(0, 1)).sum())}/{pre.shape[-1]}, on every pair "
      f"{int(positive.all(axis=(0, 1)).sum())}"
    )
  lines.append(f"recomputed scores: max |difference| to the model's {error:.2g}")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  model_cfg = dict(config.model)
  if FLAGS.run == "init":
    variables = None
  else:
    variables, record = checkpoint.load_variables(FLAGS.run)
    model_cfg.update(
      {k: v for k, v in record.get("model", {}).items() if k in _ARCHITECTURE}
    )
  if model_cfg["head"] != "sgr":
    raise SystemExit("error: --run: this recomputes the SGR head; got a SAF model")

  def check_vocab(size):
    model_cfg["vocab_size"] = size

  images, tokens, lengths = _split_inputs(
    config, check_vocab, FLAGS.split, FLAGS.images
  )
  model = SGRAF(
    vocab_size=model_cfg["vocab_size"],
    **{k: model_cfg[k] for k in _ARCHITECTURE},
  )
  if variables is None:
    variables = model.init(
      jax.random.PRNGKey(config.train.seed), images, tokens, lengths, train=False
    )
  print(f"{FLAGS.run}: {len(images)} {FLAGS.split} images x their first captions")
  print(report(model, variables, images, tokens, lengths))


FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/demo.py", "Training config."
)
flags.DEFINE_string("run", "init", "Run workdir or checkpoint folder, or 'init'.")
flags.DEFINE_string("split", "test", "Split whose images and captions are scored.")
flags.DEFINE_integer("images", 32, "Images (and as many captions) to score.")

if __name__ == "__main__":
  app.run(main)
