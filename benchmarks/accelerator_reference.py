"""The PyTorch reference for benchmarks/accelerator.py: its timings in their own
process, and our scores against its scores on the same inputs."""

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import measure
import numpy as np

from srem_jax.models.sgraf import SGRAF
from srem_jax.models.torch_import import load_torch_checkpoint

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_SCRIPT = ROOT / "benchmarks" / "torch_reference.py"


def _load_reference():
  # benchmarks/ is a folder of scripts, not a package: load the file itself.
  spec = importlib.util.spec_from_file_location("torch_reference", REFERENCE_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def reference_device(smoke: bool) -> str:
  if smoke:
    return "cpu"
  try:
    import torch
  except ImportError:
    return "cpu"
  return "cuda" if torch.cuda.is_available() else "cpu"


def part_reference(mode, sizes, device, timeout_s, smoke):
  """`torch_reference.py` in its own process: it frees its GPU memory on exit,
  and JAX in it stays on the CPU (JAX_PLATFORMS=cpu), so it holds none."""
  command = [
    sys.executable,
    str(REFERENCE_SCRIPT),
    mode,
    "--head=sgr",
    f"--caption_len={sizes.caption_len}",
    f"--device={device}",
  ]
  if mode == "train_step":
    command += [f"--batch={sizes.batch}", f"--steps={sizes.train_steps}"]
  else:
    n_img, n_cap = sizes.ref_eval
    command += [f"--n_img={n_img}", f"--n_cap={n_cap}", f"--steps={sizes.eval_steps}"]
  if smoke:
    command += ["--tiny", "--threads=1"]
  paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
  env = dict(os.environ, PYTHONPATH=":".join(paths), JAX_PLATFORMS="cpu")
  done = subprocess.run(
    command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
  )
  if done.returncode:
    raise RuntimeError(
      f"{' '.join(command[1:])} exited {done.returncode}:\n{done.stderr[-3000:]}"
    )
  result = json.loads(done.stdout.strip().splitlines()[-1])
  result["command"] = " ".join(["python"] + command[1:])
  return result


def _reference_model(torch_reference, dims, seed=0):
  """The reference at its own init, with biases, BatchNorm affines and running
  statistics moved off their init values (weight matrices untouched, so the
  activations stay in the ranges a trained model sees): a misplaced bias or
  statistic then changes the scores."""
  import torch

  torch.manual_seed(seed)
  model = torch_reference.ReferenceSGRAF("sgr", **dims)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point() or tensor.ndim > 1:
        continue
      noise = torch.rand(tensor.shape, generator=gen)
      if name.endswith("running_var"):
        tensor.copy_(0.5 + noise)
      else:
        tensor.add_(0.2 * (noise - 0.5))
  return model.eval()


def _save_ncr_checkpoint(model, dims, path):
  """The three parts' state dicts and the `opt` NCR saves, as NCR saves them."""
  import torch

  opt = argparse.Namespace(
    module_name="SGR",
    img_dim=dims["img_dim"],
    embed_size=dims["embed_dim"],
    word_dim=dims["word_dim"],
    sim_dim=dims["sim_dim"],
    sgr_step=dims["sgr_steps"],
    num_layers=1,
    bi_gru=True,
    no_imgnorm=False,
    no_txtnorm=False,
  )
  parts = [model.img_enc, model.txt_enc, model.sim_enc]
  torch.save({"model": [p.float().state_dict() for p in parts], "opt": opt}, path)


def _max_rel(ours, ref) -> float:
  return float(np.max(np.abs(ours - ref) / np.abs(ref)))


def part_agreement(sizes, model_kw, device):
  """Our scores against the reference's on the same raw images and captions."""
  import torch

  torch_reference = _load_reference()
  dims, length = sizes.dims, sizes.caption_len
  n_img, n_cap = sizes.agree
  rng = np.random.default_rng(1)
  images = rng.standard_normal((n_img, dims["num_regions"], dims["img_dim"]))
  images = images.astype(np.float32)
  lengths = rng.integers(max(1, length // 2), length + 1, size=n_cap)
  lengths[0] = length
  tokens = rng.integers(4, dims["vocab_size"], size=(n_cap, length))
  tokens[np.arange(length)[None] >= lengths[:, None]] = 0

  model = _reference_model(torch_reference, dims)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "reference_sgr.pth.tar")
    _save_ncr_checkpoint(model, dims, path)
    [(overrides, variables)] = load_torch_checkpoint(path, "A")

  def reference(net, dtype, where):
    with torch.no_grad():
      sims = net.to(dtype=dtype, device=where)(
        torch.from_numpy(images).to(dtype=dtype, device=where),
        torch.from_numpy(tokens).to(where),
        torch.from_numpy(lengths),  # pack_padded_sequence wants host lengths
      )
    return sims.cpu().double().numpy()

  ref64 = reference(copy.deepcopy(model), torch.float64, "cpu")
  flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  try:
    ref32 = reference(model, torch.float32, device)
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

  ours = {}
  variants = {
    "float32_highest": dict(precision="highest"),
    "float32_default": dict(precision="default"),
    "bfloat16_highest": dict(precision="highest", dtype=jnp.bfloat16),
  }
  for name, change in variants.items():
    net = SGRAF(**overrides, **dict(model_kw, **change))
    score = jax.jit(lambda v, i, t, n, net=net: net.apply(v, i, t, n, train=False))
    ours[name] = np.asarray(score(variables, images, tokens, lengths), np.float64)
  errors = {f"{name}_vs_ref32": _max_rel(x, ref32) for name, x in ours.items()}
  errors |= {f"{name}_vs_ref64": _max_rel(x, ref64) for name, x in ours.items()}
  errors["ref32_vs_ref64"] = _max_rel(ref32, ref64)
  # An untrained model's scores sit close together; the error against their
  # spread says whether it could reorder a ranking.
  spread = float(ref32.max() - ref32.min())
  over_spread = {
    f"{name}_vs_ref32": float(np.max(np.abs(x - ref32))) / spread
    for name, x in ours.items()
  }
  return {
    "bench": "agreement",
    "max_rel_err": errors,
    "max_abs_err_over_spread": over_spread,
    "reference": f"float32 on {device}, TF32 off; float64 on cpu",
    "ours_device": measure.device_kind(),
    "ref_scores": {
      "min": float(ref32.min()),
      "max": float(ref32.max()),
      "std": float(ref32.std()),
      "spread": spread,
    },
    "shapes": {"n_img": n_img, "n_cap": n_cap, "caption_len": length, **dims},
    "model_kw": {k: v for k, v in model_kw.items() if k != "precision"},
  }
