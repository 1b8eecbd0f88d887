"""benchmarks/torch_reference.py computes the same function as our SGRAF.

The torch reference model is saved as an NCR checkpoint, imported with
`load_torch_checkpoint`, and both score the same raw images and captions.
"""

import argparse
import json

import jax
import numpy as np
import pytest
from scripts import load_benchmark

from srem_jax.methods.losses import triplet_hardest
from srem_jax.models.sgraf import SGRAF
from srem_jax.models.torch_import import load_torch_checkpoint

torch = pytest.importorskip("torch")

DIMS = dict(
  num_regions=6, img_dim=12, embed_dim=16, word_dim=8, sim_dim=8, vocab_size=50,
  sgr_steps=3,
)  # fmt: skip


torch_reference = load_benchmark("torch_reference")


@pytest.fixture(autouse=True)
def one_thread():
  # Tiny matmuls run faster on one thread, and a busy machine does not stall them.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _reference_model(head, seed=0):
  torch.manual_seed(seed)
  model = torch_reference.ReferenceSGRAF(head, **DIMS)
  # The reference init has zero biases and identity BatchNorms; move every
  # tensor so that a misplaced bias or running statistic changes the scores.
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if name.endswith("running_var"):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
      elif tensor.is_floating_point():
        tensor.add_(torch.rand(tensor.shape, generator=gen) - 0.5)
  return model


def _import(model, head, tmp_path):
  """Our SGRAF fields and variables from the model saved as an NCR checkpoint."""
  parts = [model.img_enc, model.txt_enc, model.sim_enc]
  opt = argparse.Namespace(
    module_name=head.upper(), img_dim=DIMS["img_dim"], embed_size=DIMS["embed_dim"],
    word_dim=DIMS["word_dim"], sim_dim=DIMS["sim_dim"], sgr_step=DIMS["sgr_steps"],
    num_layers=1, bi_gru=True, no_imgnorm=False, no_txtnorm=False,
  )  # fmt: skip
  path = tmp_path / f"{head}.pth.tar"
  torch.save({"model": [p.float().state_dict() for p in parts], "opt": opt}, path)
  [(overrides, variables)] = load_torch_checkpoint(str(path), "A")
  return overrides, variables


def _inputs(n_img=3, n_cap=4, caption_len=7, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n_img, DIMS["num_regions"], DIMS["img_dim"]))
  lengths = rng.integers(1, caption_len + 1, size=n_cap)
  lengths[0] = caption_len
  tokens = rng.integers(4, DIMS["vocab_size"], size=(n_cap, caption_len))
  tokens[np.arange(caption_len)[None] >= lengths[:, None]] = 0
  return images.astype(np.float32), tokens, lengths


def _torch_scores(model, images, tokens, lengths):
  return model.double()(
    torch.from_numpy(images).double(),
    torch.from_numpy(tokens),
    torch.from_numpy(lengths),
  )


@pytest.mark.parametrize("head", ["sgr", "saf"])
def test_eval_scores_equal_our_model(tmp_path, head):
  model = _reference_model(head).eval()
  overrides, variables = _import(model, head, tmp_path)
  images, tokens, lengths = _inputs()
  with torch.no_grad():
    expected = _torch_scores(model, images, tokens, lengths).numpy()
  ours = SGRAF(**overrides).apply(variables, images, tokens, lengths, train=False)
  assert expected.shape == (3, 4)
  np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["sgr", "saf"])
def test_train_mode_scores_loss_and_batch_stats_equal_our_model(tmp_path, head):
  # Dropout off on both sides: what remains of train mode is the BatchNorms'
  # batch statistics and running-statistic updates (per caption for SAF).
  model = _reference_model(head).train()
  for module in model.modules():
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  overrides, variables = _import(model, head, tmp_path)
  images, tokens, lengths = _inputs(n_img=5, n_cap=5)
  sims = _torch_scores(model, images, tokens, lengths)
  loss = torch_reference.triplet_loss(sims)
  ours, updated = SGRAF(**overrides, dropout=0.0).apply(
    variables, images, tokens, lengths, train=True, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(ours, sims.detach().numpy(), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(triplet_hardest(ours)[0], loss.item(), rtol=2e-5)
  _, after = _import(model, head, tmp_path)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
    updated["batch_stats"],
    after["batch_stats"],
  )


@pytest.mark.parametrize("mode", ["train_step", "eval"])
def test_program_prints_one_json_line_last(capsys, mode):
  torch_reference.main(
    [mode, "--tiny", "--batch=4", "--n_img=3", "--n_cap=5", "--caption_len=5",
     "--steps=2", "--head=saf", "--threads=1"]
  )  # fmt: skip
  lines = capsys.readouterr().out.strip().splitlines()
  result = json.loads(lines[-1])
  assert lines[0].startswith("warm-up") and len(result["times_s"]) == 2
  assert result["bench"] == mode and result["head"] == "saf"
  assert result["pairs_per_s"] > 0 and result["threads"] == 1
