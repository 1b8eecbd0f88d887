"""Encoders and layers against torch.nn modules and a float64 NumPy GRU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srem_jax.models.encoders import (
  BiGRU,
  TextEncoder,
  TorchBatchNorm,
  dense,
  l2_normalize,
)
from srem_jax.models.numerics import matmul

LENGTHS = np.array([6, 3, 1, 4])


def _gru_inputs(in_dim=5, hidden=7):
  x = np.random.default_rng(0).normal(size=(len(LENGTHS), 6, in_dim)).astype(np.float32)
  mask = np.arange(6)[None] < LENGTHS[:, None]
  gru = BiGRU(hidden)
  params = gru.init(jax.random.PRNGKey(1), x, mask)["params"]
  return gru, params, x, mask


def _numpy_gru(x, params, prefix):
  """Float64 PyTorch GRU equations over one unpadded sequence."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  hidden = p[f"{prefix}_hidden_kernel"].shape[0]
  h, outputs = np.zeros(hidden), []
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  for x_t in x:
    gx = x_t @ p[f"{prefix}_input_kernel"] + p[f"{prefix}_input_bias"]
    gh = h @ p[f"{prefix}_hidden_kernel"] + p[f"{prefix}_hidden_bias"]
    r = sigmoid(gx[:hidden] + gh[:hidden])
    z = sigmoid(gx[hidden : 2 * hidden] + gh[hidden : 2 * hidden])
    n = np.tanh(gx[2 * hidden :] + r * gh[2 * hidden :])
    h = (1 - z) * n + z * h
    outputs.append(h)
  return np.stack(outputs)


def test_bigru_matches_numpy_per_sequence():
  gru, params, x, mask = _gru_inputs()
  forward, backward = gru.apply({"params": params}, x, mask)
  for m, length in enumerate(LENGTHS):
    seq = x[m, :length].astype(np.float64)
    np.testing.assert_allclose(
      forward[m, :length], _numpy_gru(seq, params, "forward"), atol=1e-5
    )
    expected_bwd = _numpy_gru(seq[::-1], params, "backward")[::-1]
    np.testing.assert_allclose(backward[m, :length], expected_bwd, atol=1e-5)
    assert not np.any(forward[m, length:]) and not np.any(backward[m, length:])


def test_bigru_matches_torch_packed_sequence():
  torch = pytest.importorskip("torch")
  gru, params, x, mask = _gru_inputs()
  forward, backward = gru.apply({"params": params}, x, mask)
  reference = torch.nn.GRU(5, 7, batch_first=True, bidirectional=True)
  with torch.no_grad():
    for suffix, prefix in (("", "forward"), ("_reverse", "backward")):
      for torch_name, ours in (
        ("weight_ih", "input_kernel"),
        ("weight_hh", "hidden_kernel"),
      ):
        getattr(reference, f"{torch_name}_l0{suffix}").copy_(
          torch.tensor(np.asarray(params[f"{prefix}_{ours}"]).T)
        )
      for torch_name, ours in (("bias_ih", "input_bias"), ("bias_hh", "hidden_bias")):
        getattr(reference, f"{torch_name}_l0{suffix}").copy_(
          torch.tensor(np.asarray(params[f"{prefix}_{ours}"]))
        )
    packed = torch.nn.utils.rnn.pack_padded_sequence(
      torch.tensor(x), torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False
    )
    out, _ = reference(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(
      out, batch_first=True, total_length=6
    )
  out = out.numpy()
  np.testing.assert_allclose(forward, out[..., :7], atol=1e-5)
  np.testing.assert_allclose(backward, out[..., 7:], atol=1e-5)


def test_text_encoder_ignores_padding_and_zeroes_it():
  enc = TextEncoder(vocab_size=50, word_dim=8, embed_dim=16, dropout=0.4)
  tokens = np.random.default_rng(1).integers(4, 50, size=(4, 6))
  tokens = np.where(np.arange(6)[None] < LENGTHS[:, None], tokens, 0)
  variables = enc.init(jax.random.PRNGKey(0), tokens, LENGTHS, train=False)
  words = enc.apply(variables, tokens, LENGTHS, train=False)
  longer = enc.apply(variables, np.pad(tokens, ((0, 0), (0, 3))), LENGTHS, train=False)
  np.testing.assert_allclose(longer[:, :6], words, atol=1e-6)
  real = np.arange(6)[None] < LENGTHS[:, None]
  assert np.all(words[~real] == 0)
  np.testing.assert_allclose(np.linalg.norm(words[real], axis=-1), 1.0, atol=1e-5)


def test_initialisers_follow_the_reference_bounds():
  enc = TextEncoder(vocab_size=400, word_dim=30, embed_dim=40, dropout=0.4)
  params = enc.init(
    jax.random.PRNGKey(0), np.ones((2, 3), int), np.array([3, 2]), train=False
  )
  embedding = params["params"]["embed"]["embedding"]
  assert 0.09 < np.abs(embedding).max() <= 0.1
  gru_bound = 1 / np.sqrt(40)
  for name, value in params["params"]["cap_rnn"].items():
    assert 0.9 * gru_bound < np.abs(value).max() <= gru_bound, name
  layer = dense(60, jnp.float32, "fc")
  kernel = layer.init(jax.random.PRNGKey(0), np.ones((1, 40)))["params"]["kernel"]
  assert 0.9 * np.sqrt(6 / 100) < np.abs(kernel).max() <= np.sqrt(6 / 100)


def test_dense_matches_torch_linear():
  torch = pytest.importorskip("torch")
  linear = torch.nn.Linear(5, 3)
  x = np.random.default_rng(2).normal(size=(4, 2, 5)).astype(np.float32)
  params = {
    "kernel": linear.weight.detach().numpy().T,
    "bias": linear.bias.detach().numpy(),
  }
  ours = dense(3, jnp.float32, "fc").apply({"params": params}, x)
  np.testing.assert_allclose(ours, linear(torch.tensor(x)).detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("shape, channel_axis", [((5, 4, 3), 1), ((6, 4), -1)])
def test_batch_norm_matches_torch_train_and_eval(shape, channel_axis):
  torch = pytest.importorskip("torch")
  channels = shape[channel_axis]
  reference = torch.nn.BatchNorm1d(channels)
  with torch.no_grad():
    reference.weight.uniform_(0.5, 1.5)
    reference.bias.uniform_(-0.5, 0.5)
  bn = TorchBatchNorm(channel_axis=channel_axis)
  rng = np.random.default_rng(3)
  variables = {
    "params": {
      "scale": reference.weight.detach().numpy(),
      "bias": reference.bias.detach().numpy(),
    },
    "batch_stats": {"mean": np.zeros(channels), "var": np.ones(channels)},
  }

  def to_torch_layout(x):  # torch wants channels on axis 1
    return torch.tensor(np.moveaxis(x, channel_axis, 1))

  reference.train()
  for _ in range(2):
    x = rng.normal(2.0, 3.0, size=shape).astype(np.float32)
    ours, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    expected = np.moveaxis(
      reference(to_torch_layout(x)).detach().numpy(), 1, channel_axis
    )
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    variables = {**variables, **updates}
  np.testing.assert_allclose(
    variables["batch_stats"]["mean"], reference.running_mean.numpy(), atol=1e-6
  )
  np.testing.assert_allclose(
    variables["batch_stats"]["var"], reference.running_var.numpy(), rtol=1e-5
  )
  reference.eval()
  x = rng.normal(size=shape).astype(np.float32)
  expected = np.moveaxis(
    reference(to_torch_layout(x)).detach().numpy(), 1, channel_axis
  )
  np.testing.assert_allclose(bn.apply(variables, x, train=False), expected, atol=1e-5)


def test_l2_normalize_keeps_zero_vectors_zero():
  x = np.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


# ---- bfloat16 matmuls ---------------------------------------------------------


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, str]]:
  """(lhs, rhs, output) dtypes of every dot_general in a jaxpr and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(tuple(str(v.aval.dtype) for v in (*eqn.invars, *eqn.outvars)))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _dot_operand_dtypes(inner)
  return found


@pytest.mark.parametrize(
  "spec",
  [
    "ij,jk->ik",
    "nre,cle->ncrl",
    "ncij,ncjs->ncis",
    "ncrl,nre->ncle",
    "mli,ig->mlg",
    "dmh,dhg->dmg",
    "ji,kj->ik",
  ],
)
def test_bf16_matmul_backward_runs_in_bf16_and_matches_float64(spec):
  rng = np.random.default_rng(0)
  sizes = dict(i=5, j=7, k=3, n=2, r=4, e=6, c=3, l=5, s=4, m=3, g=6, d=2, h=4)
  shape = lambda term: tuple(sizes[ch] for ch in term)
  ins, out = spec.split("->")
  a_spec, b_spec = ins.split(",")
  a = rng.normal(size=shape(a_spec)).astype(np.float32)
  b = rng.normal(size=shape(b_spec)).astype(np.float32)
  w = rng.normal(size=shape(out)).astype(np.float32)

  def loss(a, b, mm):
    return jnp.sum(w * mm(spec, a, b))

  bf16 = lambda s, x, y: matmul(s, x, y, jnp.bfloat16)
  plain = lambda s, x, y: jnp.einsum(
    s,
    x.astype(jnp.bfloat16),
    y.astype(jnp.bfloat16),
    preferred_element_type=jnp.float32,
  )
  # Same forward as a plain bf16 einsum with float32 output.
  np.testing.assert_array_equal(bf16(spec, a, b), plain(spec, a, b))
  # Gradients against float64 on the bf16-rounded operands: the only extra
  # rounding is the cotangent's and the products' bf16 outputs.
  round16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  a64, b64 = round16(a), round16(b)
  ga, gb = jax.grad(loss, argnums=(0, 1))(a, b, bf16)
  ref_a = np.einsum(f"{out},{b_spec}->{a_spec}", round16(w), b64)
  ref_b = np.einsum(f"{out},{a_spec}->{b_spec}", round16(w), a64)
  for got, ref in ((ga, ref_a), (gb, ref_b)):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=2e-2 * scale)
  # Every backward product has bf16 operands; plain autodiff promotes to f32.
  grad_jaxpr = lambda mm: (
    jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(a, b, mm).jaxpr
  )
  # The forward product, then the two backward products of each platform's
  # path (CPU layout and plain), both in the jaxpr until it is lowered.
  ours = _dot_operand_dtypes(grad_jaxpr(bf16))
  assert ours == [("bfloat16", "bfloat16", "float32")] * 5, ours
  # ... and accumulates in float32: the gradients equal a float32 computation
  # of the same bf16-rounded cotangent and operands.
  w16 = round16(w).astype(np.float32)
  a32, b32 = a64.astype(np.float32), b64.astype(np.float32)
  want_a, want_b = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), a32, b32)[1](w16)
  np.testing.assert_allclose(round16(ga), round16(want_a), rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(round16(gb), round16(want_b), rtol=1e-2, atol=1e-2)
  theirs = _dot_operand_dtypes(grad_jaxpr(plain))
  assert any("float32" in d for d in theirs), theirs


def test_float32_matmul_is_the_plain_einsum():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(4, 6)), rng.normal(size=(6, 3))
  a, b = a.astype(np.float32), b.astype(np.float32)
  got = jax.grad(lambda x: jnp.sum(matmul("ij,jk->ik", x, b, jnp.float32) ** 2))(a)
  want = jax.grad(lambda x: jnp.sum(jnp.einsum("ij,jk->ik", x, b) ** 2))(a)
  np.testing.assert_allclose(got, want, rtol=1e-6)
