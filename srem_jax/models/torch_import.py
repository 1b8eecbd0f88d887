"""Import of NCR / SGRAF PyTorch checkpoints into `SGRAF` variables
(docs/ncr.md §Evaluating NCR/SGRAF PyTorch checkpoints).

Owns `load_torch_checkpoint`. A checkpoint (`model_best.pth.tar`) is a dict
with `model_A`/`model_B` (NCR) or `model` (SGRAF), each a list of three state
dicts [image encoder, text encoder, similarity encoder], and `opt`. The model
shape is read from the tensors and cross-checked against `opt`; every tensor
must be used and every parameter found, or a `UserError` names the keys.
`torch` is an optional extra (`pip install -e '.[torch]'`), imported here only.
Loading uses torch's `weights_only` unpickler, which allows only tensors,
`argparse.Namespace` and NumPy scalars.

    [(overrides, variables)] = load_torch_checkpoint("model_best.pth.tar", "A")
    vocab_size = overrides.pop("vocab_size")
    config.model.update(overrides)
    model = build_model(config.model, vocab_size, execution.resolve(config.execution))
    sims = model.apply(variables, images, tokens, lengths, train=False)
"""

import argparse
import pickle

import jax
import jax.numpy as jnp
import numpy as np

from srem_jax.errors import UserError
from srem_jax.models.sgraf import SGRAF

_MODEL_KEYS = {"A": ("model_A",), "B": ("model_B",), "AB": ("model_A", "model_B")}
_PART_NAMES = ("img_enc", "txt_enc", "sim_enc")


def _linear(key, path):
  return [(f"{key}.weight", "params", path + ("kernel",), True),
          (f"{key}.bias", "params", path + ("bias",), False)]  # fmt: skip


def _batch_norm(key, path, stats_path=None):
  stats_path = stats_path or path
  return [
    (f"{key}.weight", "params", path + ("scale",), False),
    (f"{key}.bias", "params", path + ("bias",), False),
    (f"{key}.running_mean", "batch_stats", stats_path + ("mean",), False),
    (f"{key}.running_var", "batch_stats", stats_path + ("var",), False),
  ]


def _key_table(head: str, sgr_steps: int):
  """(part, torch key, collection, our path, transpose) for every tensor."""
  img = [("img_enc", *row) for row in _linear("fc", ("img_enc", "fc"))]
  txt = [
    ("txt_enc", "embed.weight", "params", ("txt_enc", "embed", "embedding"), False)
  ]
  for suffix, direction in (("", "forward"), ("_reverse", "backward")):
    for torch_name, ours, transpose in (
      ("weight_ih", "input_kernel", True),
      ("weight_hh", "hidden_kernel", True),
      ("bias_ih", "input_bias", False),
      ("bias_hh", "hidden_bias", False),
    ):
      path = ("txt_enc", "cap_rnn", f"{direction}_{ours}")
      txt.append(
        ("txt_enc", f"cap_rnn.{torch_name}_l0{suffix}", "params", path, transpose)
      )
  sim = []
  for branch in ("local", "global"):
    sim += _linear(
      f"v_global_w.embedding_{branch}.0", ("v_global_w", f"embedding_{branch}")
    )
    sim += _batch_norm(
      f"v_global_w.embedding_{branch}.1", ("v_global_w", f"embedding_{branch}_bn")
    )
    sim += _linear(
      f"t_global_w.embedding_{branch}.0", ("t_global_w", f"embedding_{branch}")
    )
  for module in ("v_global_w", "t_global_w"):
    sim += _linear(f"{module}.embedding_common.0", (module, "embedding_common"))
  pairs = ("sim_enc", "pairs")
  for name in ("sim_tranloc_w", "sim_tranglo_w", "sim_eval_w"):
    sim += _linear(name, pairs + (name,))
  if head == "sgr":
    for step in range(sgr_steps):
      for name in ("graph_query_w", "graph_key_w", "sim_graph_w"):
        sim += _linear(
          f"SGR_module.{step}.{name}", pairs + (f"SGR_module_{step}", name)
        )
  else:
    saf = pairs + ("SAF_module",)
    sim += _linear("SAF_module.attn_sim_w", saf + ("attn_sim_w",))
    sim += [
      ("SAF_module.bn.weight", "params", saf + ("bn_scale",), False),
      ("SAF_module.bn.bias", "params", saf + ("bn_bias",), False),
      ("SAF_module.bn.running_mean", "batch_stats", ("sim_enc", "saf_bn_mean"), False),
      ("SAF_module.bn.running_var", "batch_stats", ("sim_enc", "saf_bn_var"), False),
    ]
  return img + txt + [("sim_enc", *row) for row in sim]


def _import_torch():
  try:
    import torch
  except ImportError:
    raise UserError(
      "importing a PyTorch checkpoint needs torch: pip install -e '.[torch]'"
    ) from None
  return torch


def _safe_load(torch, path: str):
  scalar = np._core.multiarray.scalar
  allowed = [
    argparse.Namespace,
    np.dtype,
    scalar,
    (scalar, "numpy.core.multiarray.scalar"),
    *{type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32)},
  ]
  try:
    with torch.serialization.safe_globals(allowed):
      return torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise UserError(f"{path}: checkpoint file not found") from None
  except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
    reason = (
      str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    )
    raise UserError(f"{path}: not a loadable PyTorch checkpoint ({reason})") from None


def _opt_value(opt, name):
  if isinstance(opt, dict):
    return opt.get(name)
  return getattr(opt, name, None)


def _model_shape(path: str, parts, opt) -> dict:
  """Model fields read from the tensor shapes, checked against `opt`."""
  img, txt, sim = parts
  for part, state, needed in (
    ("img_enc", img, "fc.weight"),
    ("txt_enc", txt, "embed.weight"),
    ("sim_enc", sim, "sim_tranloc_w.weight"),
  ):
    if needed not in state:
      raise UserError(f"{path}: {part} state dict has no '{needed}'")
  sgr_steps = len({k.split(".")[1] for k in sim if k.startswith("SGR_module.")})
  has_saf = any(k.startswith("SAF_module.") for k in sim)
  if bool(sgr_steps) == has_saf:
    raise UserError(
      f"{path}: sim_enc must hold exactly one of SGR_module or SAF_module"
    )
  shape = {
    "head": "saf" if has_saf else "sgr",
    "img_dim": int(img["fc.weight"].shape[1]),
    "embed_dim": int(img["fc.weight"].shape[0]),
    "word_dim": int(txt["embed.weight"].shape[1]),
    "sim_dim": int(sim["sim_tranloc_w.weight"].shape[0]),
    "vocab_size": int(txt["embed.weight"].shape[0]),
  }
  if sgr_steps:
    shape["sgr_steps"] = sgr_steps
  expected = {
    "module_name": shape["head"].upper(),
    "img_dim": shape["img_dim"],
    "embed_size": shape["embed_dim"],
    "word_dim": shape["word_dim"],
    "sim_dim": shape["sim_dim"],
    "sgr_step": sgr_steps or None,
    "num_layers": 1,
    "bi_gru": True,
    "no_imgnorm": False,
    "no_txtnorm": False,
  }
  for name, value in expected.items():
    given = _opt_value(opt, name)
    if given is not None and value is not None and given != value:
      raise UserError(
        f"{path}: opt.{name} is {given!r} but this model supports only {value!r}"
        " with the stored tensors"
      )
  return shape


def _convert(path, label, parts, shape, num_regions):
  table = _key_table(shape["head"], shape.get("sgr_steps", 0))
  states = dict(zip(_PART_NAMES, parts))
  missing, used = [], {name: set() for name in _PART_NAMES}
  variables = {"params": {}, "batch_stats": {}}
  for part, key, collection, target, transpose in table:
    if key not in states[part]:
      missing.append(f"{part}.{key}")
      continue
    used[part].add(key)
    array = states[part][key].detach().cpu().float().numpy()
    node = variables[collection]
    for name in target[:-1]:
      node = node.setdefault(name, {})
    node[target[-1]] = jnp.asarray(array.T if transpose else array)
  unused = sorted(
    f"{part}.{key}"
    for part in _PART_NAMES
    for key in states[part]
    if key not in used[part] and not key.endswith("num_batches_tracked")
  )
  if missing or unused:
    raise UserError(
      f"{path}: {label} does not match an SGRAF {shape['head'].upper()} model:"
      f" missing keys {missing}, unused keys {unused}"
    )
  _check_shapes(path, label, variables, shape, num_regions, table)
  return variables


def _check_shapes(path, label, variables, shape, num_regions, table):
  model = SGRAF(**shape)
  expected = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0),
      jnp.zeros((2, num_regions, shape["img_dim"])),
      jnp.ones((2, 3), jnp.int32),
      jnp.array([3, 2]),
      train=False,
    )
  )
  for part, key, collection, target, transpose in table:
    want, got = expected[collection], variables[collection]
    for name in target:
      want, got = want[name], got[name]
    if got.shape != want.shape:

      def torch_layout(shape):
        return tuple(reversed(shape)) if transpose else tuple(shape)

      raise UserError(
        f"{path}: {label} {part}.{key} has shape {torch_layout(got.shape)},"
        f" expected {torch_layout(want.shape)}"
      )


def load_torch_checkpoint(path: str, which: str = "A") -> list[tuple[dict, dict]]:
  """One (model_overrides, variables) per requested model ("A", "B" or "AB").

  `model_overrides` holds `config.model` fields (head, img_dim, embed_dim,
  word_dim, sim_dim, sgr_steps for SGR) plus `vocab_size`; `variables` is
  {"params", "batch_stats"} for `SGRAF`. For "AB" the caller averages the two
  models' similarity matrices, as NCR does.
  """
  if which not in _MODEL_KEYS:
    raise UserError(f"which: expected 'A', 'B' or 'AB', got {which!r}")
  torch = _import_torch()
  checkpoint = _safe_load(torch, path)
  if not isinstance(checkpoint, dict):
    raise UserError(
      f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}"
    )
  keys = _MODEL_KEYS[which]
  if which == "A" and "model_A" not in checkpoint and "model" in checkpoint:
    keys = ("model",)
  opt = checkpoint.get("opt")
  models = []
  for label in keys:
    if label not in checkpoint:
      raise UserError(
        f"{path}: no '{label}' entry (found {sorted(map(str, checkpoint))})"
      )
    parts = checkpoint[label]
    if not isinstance(parts, (list, tuple)) or len(parts) != 3:
      raise UserError(
        f"{path}: '{label}' must be a list of 3 state dicts"
        " [image encoder, text encoder, similarity encoder]"
      )
    shape = _model_shape(path, parts, opt)
    bn_key = "v_global_w.embedding_local.1.weight"
    num_regions = int(parts[2][bn_key].shape[0]) if bn_key in parts[2] else 36
    variables = _convert(path, label, parts, shape, num_regions)
    models.append((shape, variables))
  return models
