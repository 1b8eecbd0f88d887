"""The execution plan's XLA compiler options reach every jit a run compiles.

Under the tpu preset (resolved here on the CPU) each program's `jax.jit` gets
`{"exec_time_optimization_effort": -1.0}`; under the cpu preset it gets None,
as before the presets had options. `python -m srem_jax.aot` builds its
programs through the same functions, so they carry the same options.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny

from configs import demo
from srem_jax import aot, execution, sharding
from srem_jax.compile import shapes, targets
from srem_jax.eval import retrieval
from srem_jax.models.sgraf import build_model
from srem_jax.train import co_training, selection, step

TPU = execution.resolve({"preset": "tpu"}, device=jax.devices("cpu")[0])
CPU = execution.resolve({"preset": "cpu"}, device=jax.devices("cpu")[0])
R, D, L, VOCAB = 4, 12, 7, 30


def test_only_the_tpu_preset_has_options():
  assert TPU.compiler_options() == {"exec_time_optimization_effort": -1.0}
  assert CPU.compiler_options() is None
  assert execution.compiler_options(None) is None


@pytest.fixture
def options_of(monkeypatch):
  """`options_of(fn)`: the `compiler_options` the jit that made `fn` got (a
  KeyError for a function no `jax.jit` made during the test)."""
  real, made = jax.jit, []

  def recording(*args, **kwargs):
    jitted = real(*args, **kwargs)
    made.append((jitted, kwargs.get("compiler_options")))
    return jitted

  monkeypatch.setattr(jax, "jit", recording)
  # Built functions are cached per (model, mesh, plan): build them afresh.
  retrieval.eval_functions.cache_clear()
  selection.statistics_function.cache_clear()

  def lookup(fn):
    for jitted, options in made:
      if jitted is fn:
        return options
    raise KeyError(fn)

  lookup.made = made
  return lookup


@pytest.mark.parametrize("plan", [TPU, CPU], ids=["tpu", "cpu"])
def test_every_step_pass_and_scorer_is_jitted_with_the_plan_s_options(options_of, plan):
  model = build_model(tiny.model_config("sgr", img_dim=D), VOCAB, CPU)
  mesh = sharding.make_mesh(-1)
  tx = optax.sgd(0.1)
  # Compiled and run here: the init's jit is the only one made so far.
  step.init_state(
    model, tx, seed=0, num_regions=R, img_dim=D, caption_len=L, mesh=mesh, plan=plan
  )
  assert [options for _, options in options_of.made] == [plan.compiler_options()]
  fns = [
    step.make_train_step(
      model, tx, tiny.loss_options(), mesh, warmup=False,
      external_selection=False, plan=plan,
    ),
    selection.statistics_function(
      model, selection.SremStatistics(0.05, 1.0), mesh, False, plan
    ),
    co_training.jit_step(lambda carry, batch: (carry, batch), mesh, plan).jitted,
    *retrieval.eval_functions(model, mesh, plan),
  ]  # fmt: skip
  assert [options_of(fn) for fn in fns] == [plan.compiler_options()] * 6


def test_a_compiled_ahead_step_hands_its_options_to_xla(monkeypatch):
  # An option XLA does not know fails the compile: the options got there.
  monkeypatch.setattr(
    execution.Execution, "compiler_options", lambda self: {"no_such_option": 1}
  )
  fn = co_training.jit_step(lambda carry, x: (carry, x + 1), sharding.make_mesh(1), TPU)
  assert isinstance(fn, step.TimedJit)
  with pytest.raises(Exception, match="no_such_option"):
    fn(jnp.zeros(()), jnp.ones(2))
  plain = co_training.jit_step(lambda carry, x: (carry, x + 1), sharding.make_mesh(1))
  np.testing.assert_array_equal(plain(jnp.zeros(()), jnp.ones(2))[1], [2.0, 2.0])


@pytest.mark.parametrize("method", ["srem", "ncr"])
def test_aot_programs_carry_the_target_s_options(options_of, method):
  config = demo.get_config()
  config.loss.name = method
  plan = execution.resolve(
    config.execution, device=aot._TargetDevice(targets.TARGETS["v5e-8"])
  )
  mesh = sharding.make_mesh(-1)
  programs = aot.RunPrograms(config, mesh, plan, shapes.data_shapes(config)).all()
  assert len(programs) >= 5
  for program in programs:
    assert options_of(program.fn) == TPU.compiler_options(), program.name
