"""NCR/SGRAF checkpoint import against a float64 torch forward of SPEC §2."""

import argparse
import sys

import numpy as np
import pytest

from srem_jax.errors import UserError
from srem_jax.models.torch_import import load_torch_checkpoint

torch = pytest.importorskip("torch")

V, IMG, E, WORD, SIM, R = 50, 12, 16, 8, 8, 6


def _state_dicts(head, seed):
  gen = torch.Generator().manual_seed(seed)
  rand = lambda *shape: torch.rand(*shape, generator=gen) - 0.5

  def linear(name, i, o):
    return {f"{name}.weight": rand(o, i), f"{name}.bias": rand(o)}

  def batch_norm(name, c):
    return {
      f"{name}.weight": 1 + rand(c),
      f"{name}.bias": rand(c),
      f"{name}.running_mean": rand(c),
      f"{name}.running_var": 0.5 + torch.rand(c, generator=gen),
      f"{name}.num_batches_tracked": torch.tensor(7),
    }

  img = linear("fc", IMG, E)
  gru = torch.nn.GRU(WORD, E, batch_first=True, bidirectional=True)
  txt = {"embed.weight": rand(V, WORD)}
  txt |= {f"cap_rnn.{k}": rand(*v.shape) for k, v in gru.state_dict().items()}
  sim = {}
  for module in ("v_global_w", "t_global_w"):
    sim |= linear(f"{module}.embedding_local.0", E, E)
    sim |= linear(f"{module}.embedding_global.0", E, E)
    sim |= linear(f"{module}.embedding_common.0", E, 1)
  sim |= batch_norm("v_global_w.embedding_local.1", R)
  sim |= batch_norm("v_global_w.embedding_global.1", E)
  sim |= linear("sim_tranloc_w", E, SIM) | linear("sim_tranglo_w", E, SIM)
  sim |= linear("sim_eval_w", SIM, 1)
  if head == "SGR":
    for step in range(3):
      for name in ("graph_query_w", "graph_key_w", "sim_graph_w"):
        sim |= linear(f"SGR_module.{step}.{name}", SIM, SIM)
  else:
    sim |= linear("SAF_module.attn_sim_w", SIM, 1) | batch_norm("SAF_module.bn", 1)
  return [img, txt, sim]


def _reference_scores(parts, head, images, tokens, lengths):
  """The reference's eval-mode forward, caption by caption, in float64."""
  img_sd, txt_sd, sd = ({k: v.double() for k, v in p.items()} for p in parts)
  l2n = lambda x: x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)
  lin = lambda x, name, d=sd: x @ d[f"{name}.weight"].T + d[f"{name}.bias"]

  def bn(x, name, axis):
    shape = [1] * x.dim()
    shape[axis] = -1
    stat = lambda s: sd[f"{name}.{s}"].view(shape)
    normed = (x - stat("running_mean")) / (stat("running_var") + 1e-5).sqrt()
    return normed * stat("weight") + stat("bias")

  def self_attention(module, local, local_emb, global_emb):
    weights = lin(local_emb * global_emb[:, None], f"{module}.embedding_common.0")
    return l2n((weights.squeeze(-1).softmax(1)[..., None] * local).sum(1))

  v = l2n(lin(torch.tensor(images).double(), "fc", img_sd))
  v_local = torch.tanh(
    bn(lin(v, "v_global_w.embedding_local.0"), "v_global_w.embedding_local.1", 1)
  )
  v_mean = lin(v.mean(1), "v_global_w.embedding_global.0")
  v_global = torch.tanh(bn(v_mean, "v_global_w.embedding_global.1", 1))
  v_glo = self_attention("v_global_w", v, v_local, v_global)

  gru = torch.nn.GRU(WORD, E, batch_first=True, bidirectional=True).double()
  gru.load_state_dict(
    {k[len("cap_rnn.") :]: w for k, w in txt_sd.items() if "cap_rnn" in k}
  )
  words = txt_sd["embed.weight"][torch.tensor(tokens)]
  packed = torch.nn.utils.rnn.pack_padded_sequence(
    words, torch.tensor(lengths), batch_first=True, enforce_sorted=False
  )
  out, _ = torch.nn.utils.rnn.pad_packed_sequence(gru(packed)[0], batch_first=True)
  caps = l2n((out[..., :E] + out[..., E:]) / 2)

  columns = []
  for i, n in enumerate(lengths):
    t = caps[i : i + 1, :n]
    t_local = torch.tanh(lin(t, "t_global_w.embedding_local.0"))
    t_global = torch.tanh(lin(t.mean(1), "t_global_w.embedding_global.0"))
    t_glo = self_attention("t_global_w", t, t_local, t_global)
    attn = torch.nn.functional.leaky_relu(v @ t.transpose(1, 2), 0.1)  # (N, R, n)
    attn = (9.0 * l2n(attn)).transpose(1, 2).softmax(-1)  # (N, n, R)
    context = l2n(attn @ v)
    loc = l2n(lin((context - t).pow(2), "sim_tranloc_w"))
    glo = l2n(lin((v_glo - t_glo).pow(2), "sim_tranglo_w"))
    x = torch.cat([glo[:, None], loc], 1)
    if head == "SGR":
      for step in range(3):
        q = lin(x, f"SGR_module.{step}.graph_query_w")
        k = lin(x, f"SGR_module.{step}.graph_key_w")
        x = torch.relu(
          lin((q @ k.transpose(1, 2)).softmax(-1) @ x, f"SGR_module.{step}.sim_graph_w")
        )
      vec = x[:, 0]
    else:
      gate = torch.sigmoid(
        bn(lin(x, "SAF_module.attn_sim_w").transpose(1, 2), "SAF_module.bn", 1)
      )
      gate = gate / (gate.abs().sum(-1, keepdim=True) + 1e-8)
      vec = l2n((gate @ x).squeeze(1))
    columns.append(torch.sigmoid(lin(vec, "sim_eval_w")))
  return torch.cat(columns, 1).detach().numpy()


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(3, R, IMG)).astype(np.float32)
  lengths = np.array([5, 2, 7, 4])
  tokens = np.where(
    np.arange(7)[None] < lengths[:, None], rng.integers(4, V, (4, 7)), 0
  )
  return images, tokens, lengths


def _opt(head, **changes):
  fields = dict(
    module_name=head, img_dim=IMG, embed_size=E, word_dim=WORD, sim_dim=SIM,
    sgr_step=3, num_layers=1, bi_gru=True, no_imgnorm=False, no_txtnorm=False,
    vocab_size=V,
  )  # fmt: skip
  return argparse.Namespace(**(fields | changes))


def _save(tmp_path, checkpoint):
  path = str(tmp_path / "model_best.pth.tar")
  torch.save(checkpoint, path)
  return path


@pytest.mark.parametrize("head", ["SGR", "SAF"])
def test_imported_model_scores_like_the_reference(tmp_path, head):
  from srem_jax.models.sgraf import SGRAF

  model_a, model_b = _state_dicts(head, 0), _state_dicts(head, 1)
  checkpoint = {
    "model_A": model_a,
    "model_B": model_b,
    "opt": _opt(head),
    "best_rsum": np.float64(1.5),
  }
  path = _save(tmp_path, checkpoint)
  images, tokens, lengths = _inputs()
  loaded = load_torch_checkpoint(path, "AB")
  assert len(loaded) == 2
  for (overrides, variables), parts in zip(loaded, (model_a, model_b)):
    assert overrides["head"] == head.lower() and overrides["vocab_size"] == V
    assert (overrides["embed_dim"], overrides["sim_dim"], overrides["img_dim"]) == (
      E,
      SIM,
      IMG,
    )
    model = SGRAF(**overrides)
    ours = model.apply(variables, images, tokens, lengths, train=False)
    expected = _reference_scores(parts, head, images, tokens, lengths)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_single_model_checkpoint_loads_as_a(tmp_path):
  path = _save(tmp_path, {"model": _state_dicts("SAF", 0), "opt": _opt("SAF")})
  [(overrides, variables)] = load_torch_checkpoint(path, "A")
  assert overrides["head"] == "saf" and "sgr_steps" not in overrides
  np.testing.assert_allclose(
    variables["batch_stats"]["sim_enc"]["saf_bn_var"].shape, (1,)
  )
  with pytest.raises(UserError, match="no 'model_A' entry"):
    load_torch_checkpoint(path, "AB")


def _broken(tmp_path, edit, opt=None):
  parts = _state_dicts("SGR", 0)
  edit(parts)
  return _save(tmp_path, {"model_A": parts, "opt": opt or _opt("SGR")})


def test_missing_key_is_named(tmp_path):
  path = _broken(tmp_path, lambda p: p[2].pop("sim_eval_w.bias"))
  with pytest.raises(UserError, match=r"missing keys \['sim_enc.sim_eval_w.bias'\]"):
    load_torch_checkpoint(path)


def test_unused_key_is_named(tmp_path):
  path = _broken(tmp_path, lambda p: p[1].update({"extra.weight": torch.zeros(2)}))
  with pytest.raises(UserError, match=r"unused keys \['txt_enc.extra.weight'\]"):
    load_torch_checkpoint(path)


def test_wrong_shape_is_named(tmp_path):
  path = _broken(
    tmp_path, lambda p: p[1].update({"cap_rnn.weight_hh_l0": torch.zeros(48, 15)})
  )
  with pytest.raises(
    UserError,
    match=r"txt_enc.cap_rnn.weight_hh_l0 has shape \(48, 15\), expected \(48, 16\)",
  ):
    load_torch_checkpoint(path)


def test_unsupported_options_are_rejected(tmp_path):
  path = _broken(tmp_path, lambda p: None, opt=_opt("SGR", bi_gru=False))
  with pytest.raises(UserError, match="opt.bi_gru"):
    load_torch_checkpoint(path)


def test_bad_arguments_and_files(tmp_path):
  with pytest.raises(UserError, match="which"):
    load_torch_checkpoint("x.pth", "C")
  with pytest.raises(UserError, match="not found"):
    load_torch_checkpoint(str(tmp_path / "absent.pth.tar"))
  garbage = tmp_path / "garbage.pth.tar"
  garbage.write_bytes(b"not a checkpoint")
  with pytest.raises(UserError, match="garbage.pth.tar: not a loadable"):
    load_torch_checkpoint(str(garbage))


def test_missing_torch_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(UserError, match=r"pip install -e '\.\[torch\]'"):
    load_torch_checkpoint("model_best.pth.tar")
