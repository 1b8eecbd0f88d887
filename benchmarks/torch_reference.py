"""The reference SGRAF in PyTorch, run as the NCR/SGRAF code runs it, for timing.

Owns `ReferenceSGRAF` (image encoder, text encoder and similarity encoder
with the reference's module names, so their `state_dict()`s are the three
parts of an NCR checkpoint), the reference's hardest-negative triplet loss and
the program that times both the way `python benchmarks/bench.py` times ours, on
the same machine: `train_step` (encoders, all K x K pairs, loss, backward,
clipping, Adam) and `eval` (the pair loop alone on precomputed embeddings and
global vectors, under no_grad, in the reference evaluator's 100 x 100 shards).
The similarity encoder loops over captions in Python, as the reference does
(docs/method.md §Network). The last line printed is one JSON object.

With `--device=cuda` the model and its inputs live on the GPU (caption
lengths stay on the host, where `pack_padded_sequence` wants them) and every
timed repetition ends with `torch.cuda.synchronize()`, so the clock reads
finished work; TF32 is left at torch's defaults, which the JSON records.

    python benchmarks/torch_reference.py train_step --head=sgr --batch=128
    python benchmarks/torch_reference.py eval --n_img=100 --n_cap=500 --threads=2
    python benchmarks/torch_reference.py train_step --device=cuda --caption_len=40
    python benchmarks/torch_reference.py eval \
        --caption_lengths=../shared/data/f30k_caption_lengths.json

`--caption_lengths` draws the lengths from a histogram file's test split with
the generator and seed `benchmarks/bench.py` uses, so both programs see the same
lengths; the caption loop slices each caption to its own, as the reference
does.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.append(_ROOT)  # srem_jax from this source tree when none is installed

# The JAX benchmark's shapes, so both programs measure the same work.
from srem_jax import padding  # noqa: E402
from srem_jax.models.dims import PAPER_DIMS, TINY_DIMS  # noqa: E402

EVAL_SHARD = 100  # images and captions per forward_sim call in NCR's evaluator


def l2n(x, dim=-1):
  return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + 1e-8)


def xavier_linear(fan_in, fan_out):
  layer = nn.Linear(fan_in, fan_out)
  nn.init.xavier_uniform_(layer.weight)
  nn.init.zeros_(layer.bias)
  return layer


class ImageEncoder(nn.Module):
  """Regions (N, R, img_dim) -> (N, R, E), l2-normalised."""

  def __init__(self, img_dim, embed_dim):
    super().__init__()
    self.fc = xavier_linear(img_dim, embed_dim)

  def forward(self, images):
    return l2n(self.fc(images))


class TextEncoder(nn.Module):
  """Tokens (M, L) and lengths -> words (M, L, E), l2-normalised, zero when padded."""

  def __init__(self, vocab_size, word_dim, embed_dim):
    super().__init__()
    self.embed = nn.Embedding(vocab_size, word_dim)
    nn.init.uniform_(self.embed.weight, -0.1, 0.1)
    self.dropout = nn.Dropout(0.4)
    self.cap_rnn = nn.GRU(word_dim, embed_dim, batch_first=True, bidirectional=True)

  def forward(self, tokens, lengths):
    # The reference's loader sorts captions by length; unsorted input is sorted here.
    packed = pack_padded_sequence(
      self.dropout(self.embed(tokens)), lengths, batch_first=True, enforce_sorted=False
    )
    out, _ = pad_packed_sequence(
      self.cap_rnn(packed)[0], batch_first=True, total_length=tokens.shape[1]
    )
    forward, backward = out.chunk(2, dim=-1)
    return l2n((forward + backward) / 2)  # padded rows stay 0: l2n(0) = 0


class SelfAttention(nn.Module):
  """VisualSA (BatchNorm over `num_regions` then E) or, with None, TextSA."""

  def __init__(self, embed_dim, num_regions=None):
    super().__init__()

    def branch(norm):
      layers = [xavier_linear(embed_dim, embed_dim)] + ([norm] if norm else [])
      return nn.Sequential(*layers, nn.Tanh(), nn.Dropout(0.4))

    visual = num_regions is not None
    self.embedding_local = branch(nn.BatchNorm1d(num_regions) if visual else None)
    self.embedding_global = branch(nn.BatchNorm1d(embed_dim) if visual else None)
    self.embedding_common = nn.Sequential(xavier_linear(embed_dim, 1))

  def forward(self, local):
    mixed = self.embedding_local(local) * self.embedding_global(local.mean(1))[:, None]
    weights = self.embedding_common(mixed).squeeze(2).softmax(dim=1)
    return l2n((weights[..., None] * local).sum(1))


class GraphReasoning(nn.Module):
  def __init__(self, sim_dim):
    super().__init__()
    self.graph_query_w = xavier_linear(sim_dim, sim_dim)
    self.graph_key_w = xavier_linear(sim_dim, sim_dim)
    self.sim_graph_w = xavier_linear(sim_dim, sim_dim)

  def forward(self, nodes):
    query, key = self.graph_query_w(nodes), self.graph_key_w(nodes)
    edges = (query @ key.transpose(1, 2)).softmax(dim=-1)
    return torch.relu(self.sim_graph_w(edges @ nodes))


class AttentionFiltration(nn.Module):
  def __init__(self, sim_dim):
    super().__init__()
    self.attn_sim_w = xavier_linear(sim_dim, 1)
    self.bn = nn.BatchNorm1d(1)

  def forward(self, nodes):
    gate = torch.sigmoid(self.bn(self.attn_sim_w(nodes).transpose(1, 2)))
    gate = gate / (gate.abs().sum(-1, keepdim=True) + 1e-8)
    return l2n((gate @ nodes).squeeze(1))


class SimilarityEncoder(nn.Module):
  def __init__(self, head, num_regions, embed_dim, sim_dim, sgr_steps, smooth=9.0):
    super().__init__()
    self.head, self.smooth = head, smooth
    self.v_global_w = SelfAttention(embed_dim, num_regions)
    self.t_global_w = SelfAttention(embed_dim)
    self.sim_tranloc_w = xavier_linear(embed_dim, sim_dim)
    self.sim_tranglo_w = xavier_linear(embed_dim, sim_dim)
    self.sim_eval_w = xavier_linear(sim_dim, 1)
    if head == "sgr":
      self.SGR_module = nn.ModuleList(GraphReasoning(sim_dim) for _ in range(sgr_steps))
    else:
      self.SAF_module = AttentionFiltration(sim_dim)

  def context(self, words, regions):
    """SCAN attention of each word over the regions, smoothed by `self.smooth`."""
    attn = nn.functional.leaky_relu(regions @ words.transpose(1, 2), 0.1)
    attn = (l2n(attn, dim=2).transpose(1, 2) * self.smooth).softmax(dim=2)
    return l2n(attn @ regions)

  def forward(self, regions, words, lengths):
    """(images, R, E) regions and (captions, L, E) words -> (images, captions)."""
    img_glo = self.v_global_w(regions)
    caps = [words[i : i + 1, :n] for i, n in enumerate(lengths.tolist())]
    cap_glo = torch.cat([self.t_global_w(cap) for cap in caps])
    return self.score(regions, img_glo, words, cap_glo, lengths)

  def score(self, regions, img_glo, words, cap_glo, lengths):
    """The reference's loop over captions, given both sides' global vectors."""
    columns = []
    for i, n in enumerate(lengths.tolist()):
      cap = words[i : i + 1, :n].repeat(len(regions), 1, 1)
      local = l2n(self.sim_tranloc_w((self.context(cap, regions) - cap).pow(2)))
      glob = l2n(self.sim_tranglo_w((img_glo - cap_glo[i]).pow(2)))
      nodes = torch.cat([glob[:, None], local], 1)
      if self.head == "sgr":
        for step in self.SGR_module:
          nodes = step(nodes)
        vec = nodes[:, 0]
      else:
        vec = self.SAF_module(nodes)
      columns.append(torch.sigmoid(self.sim_eval_w(vec)))
    return torch.cat(columns, 1)


class ReferenceSGRAF(nn.Module):
  """Images (N, R, img_dim), tokens (M, L), lengths (M,) -> (N, M) scores."""

  def __init__(self, head, *, num_regions, img_dim, embed_dim, word_dim, sim_dim,
               vocab_size, sgr_steps):  # fmt: skip
    super().__init__()
    self.img_enc = ImageEncoder(img_dim, embed_dim)
    self.txt_enc = TextEncoder(vocab_size, word_dim, embed_dim)
    self.sim_enc = SimilarityEncoder(head, num_regions, embed_dim, sim_dim, sgr_steps)

  def forward(self, images, tokens, lengths):
    words = self.txt_enc(tokens, lengths)
    return self.sim_enc(self.img_enc(images), words, lengths)


def triplet_loss(sims, margin=0.2):
  """VSE++ hardest negatives, summed over images and captions (pair i is (i, i))."""
  diagonal = sims.diag()
  positive = torch.eye(len(sims), dtype=torch.bool, device=sims.device)
  cost_cap = (margin + sims - diagonal[:, None]).clamp(min=0).masked_fill(positive, 0)
  cost_img = (margin + sims - diagonal[None]).clamp(min=0).masked_fill(positive, 0)
  return cost_cap.max(1)[0].sum() + cost_img.max(0)[0].sum()


# ---- benchmarks -------------------------------------------------------------


def _synchronizer(device):
  """What waits for the device's queued work: a GPU runs torch's calls asynchronously."""
  if torch.device(device).type == "cuda":
    return lambda: torch.cuda.synchronize(device)
  return lambda: None


def _measure(bench, run, steps, pairs, shapes, device="cpu"):
  """One warm-up run, then `steps` timed ones (each printed); rates of the median."""
  sync = _synchronizer(device)
  times = []
  sync()
  for step in range(steps + 1):
    start = time.perf_counter()
    run()
    sync()
    times.append(time.perf_counter() - start)
    label = "warm-up" if step == 0 else f"step {step}/{steps}"
    print(f"{label}: {times[-1]:.3f} s", flush=True)
  median_s = statistics.median(times[1:])
  return {
    "bench": bench,
    "implementation": "pytorch reference",
    "pairs_per_s": pairs / median_s,
    "warmup_s": times[0],
    "times_s": times[1:],
    "shapes": shapes,
    "device": str(device),
  }


def _random_lengths(rng, n, caption_len):
  return torch.from_numpy(rng.integers(caption_len // 2, caption_len + 1, size=n))


def _drawn_lengths(histogram, n, rng):
  lengths = torch.from_numpy(padding.draw_lengths(histogram, n, rng).astype(np.int64))
  return lengths, int(lengths.max())


def bench_train_step(
  head, batch, caption_len, steps, dims, device="cpu", histogram=None
):
  """Encoders, K x K scores, triplet loss, backward, clipping, Adam: as NCR trains."""
  torch.manual_seed(0)
  model = ReferenceSGRAF(head, **dims).train().to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
  rng = np.random.default_rng(0)
  if histogram is None:
    lengths = _random_lengths(rng, batch, caption_len)
    lengths[0] = caption_len
  else:  # padded to the batch's longest, as the reference's collate pads
    lengths, caption_len = _drawn_lengths(histogram, batch, rng)
  tokens = torch.from_numpy(rng.integers(4, dims["vocab_size"], (batch, caption_len)))
  tokens[torch.arange(caption_len)[None] >= lengths[:, None]] = 0
  images = torch.randn(batch, dims["num_regions"], dims["img_dim"])
  # Drawn on the host, so every device scores the same numbers.
  tokens, images = tokens.to(device), images.to(device)

  def run():
    loss = triplet_loss(model(images, tokens, lengths))
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    optimizer.step()

  shapes = {"batch": batch, "caption_len": caption_len, **dims,
            "mean_length": float(lengths.double().mean())}  # fmt: skip
  return _measure("train_step", run, steps, batch * batch, shapes, device)


def bench_eval(
  head, n_img, n_cap, caption_len, steps, dims, device="cpu", histogram=None
):
  """The pair loop alone on unit-norm embeddings, as benchmarks/bench.py eval times.

  Scored in NCR's evaluator's 100 x 100 shards under no_grad. The global
  vectors are given, as they are to ours: the reference's `forward_sim` would
  recompute them per shard (about 5% more work for SGR, 13% for SAF,
  at paper dims).
  """
  torch.manual_seed(0)
  model = ReferenceSGRAF(head, **dims).eval().to(device)
  rng = np.random.default_rng(0)
  if histogram is None:
    lengths = _random_lengths(rng, n_cap, caption_len)
  else:
    lengths, caption_len = _drawn_lengths(histogram, n_cap, rng)
  e = dims["embed_dim"]
  regions = l2n(torch.randn(n_img, dims["num_regions"], e))
  img_glo = l2n(torch.randn(n_img, e))
  words = l2n(torch.randn(n_cap, caption_len, e))
  cap_glo = l2n(torch.randn(n_cap, e))
  words *= (torch.arange(caption_len)[None] < lengths[:, None])[..., None]
  regions, img_glo, words, cap_glo = (
    x.to(device) for x in (regions, img_glo, words, cap_glo)
  )

  def run():
    sims = torch.empty(n_img, n_cap, device=device)
    with torch.no_grad():
      for i in range(0, n_img, EVAL_SHARD):
        for j in range(0, n_cap, EVAL_SHARD):
          rows, cols = slice(i, i + EVAL_SHARD), slice(j, j + EVAL_SHARD)
          sims[rows, cols] = model.sim_enc.score(
            regions[rows], img_glo[rows], words[cols], cap_glo[cols], lengths[cols]
          )

  shapes = {"n_img": n_img, "n_cap": n_cap, "shard": EVAL_SHARD,
            "caption_len": caption_len, **dims,
            "mean_length": float(lengths.double().mean())}  # fmt: skip
  return _measure("eval", run, steps, n_img * n_cap, shapes, device)


def _positive(text):
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return int(text)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mode", choices=["train_step", "eval"])
  parser.add_argument("--head", choices=["sgr", "saf"], default="sgr")
  parser.add_argument("--batch", type=_positive, default=128, help="train_step: K.")
  parser.add_argument("--n_img", type=_positive, default=100, help="eval: images.")
  parser.add_argument("--n_cap", type=_positive, default=500, help="eval: captions.")
  parser.add_argument("--caption_len", type=_positive, default=15)
  parser.add_argument("--steps", type=_positive, default=3, help="Timed repetitions.")
  parser.add_argument("--threads", type=_positive, help="Default: torch's choice.")
  parser.add_argument(
    "--tiny", action="store_true", help="The tiny dims of srem_jax.models.dims."
  )
  parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
  parser.add_argument(
    "--caption_lengths", help="Histogram JSON to draw caption lengths from."
  )
  args = parser.parse_args(argv)
  if args.device == "cuda" and not torch.cuda.is_available():
    parser.error("--device=cuda: torch sees no CUDA device")
  if args.threads:
    torch.set_num_threads(args.threads)
  dims = TINY_DIMS if args.tiny else PAPER_DIMS
  histogram = None
  if args.caption_lengths:
    histogram = padding.read_histogram(args.caption_lengths)
  common = dict(dims=dims, device=args.device, histogram=histogram)
  if args.mode == "train_step":
    result = bench_train_step(
      args.head, args.batch, args.caption_len, args.steps, **common
    )
  else:
    result = bench_eval(
      args.head, args.n_img, args.n_cap, args.caption_len, args.steps, **common
    )
  if histogram is not None:
    result["caption_lengths"] = {"file": args.caption_lengths}
  if args.device == "cuda":
    result |= {
      "device_name": torch.cuda.get_device_name(),
      "allow_tf32": {
        "matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn": torch.backends.cudnn.allow_tf32,
      },
      "peak_bytes_allocated": torch.cuda.max_memory_allocated(),
    }
  result |= {
    "head": args.head,
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "load_average": os.getloadavg(),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
