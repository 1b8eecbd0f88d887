"""Selection diagnostics against hand-counted answers."""

import jax.numpy as jnp
import numpy as np
import pytest

from srem_jax.errors import UserError
from srem_jax.report import diagnostics


def test_sums_and_summary_by_hand():
  # 5 pairs: truth clean = [1,1,1,0,0]; selected = [1,1,0,1,0].
  aux = {
    "clean": jnp.array([True, True, False, True, False]),
    "energy": jnp.array([-3.0, -2.0, -1.0, 4.0, 6.0]),
    "entropy": jnp.array([0.5, 1.0, 1.5, 2.0, 3.0]),
  }
  truth = jnp.array([True, True, True, False, False])
  sums = diagnostics.selection_sums(aux, truth)
  sums = {k: float(v) for k, v in sums.items()}
  sums.update(steps=2.0, loss=3.0, loss_clean=1.0, loss_cmbcl=2.0, grad_norm=4.0)
  summary = diagnostics.epoch_summary(sums)
  assert summary["selected_frac"] == pytest.approx(3 / 5)
  assert summary["selection_precision"] == pytest.approx(2 / 3)
  assert summary["selection_recall"] == pytest.approx(2 / 3)
  assert summary["energy_clean"] == pytest.approx(-2.0)
  assert summary["energy_noisy"] == pytest.approx(5.0)
  assert summary["entropy_clean"] == pytest.approx(1.0)
  assert summary["entropy_noisy"] == pytest.approx(2.5)
  assert summary["loss"] == pytest.approx(1.5)  # per step


def test_no_noisy_pairs_gives_nan_means_not_an_error():
  aux = {"clean": jnp.ones(3, bool), "energy": jnp.zeros(3), "entropy": jnp.zeros(3)}
  sums = {
    k: float(v) for k, v in diagnostics.selection_sums(aux, jnp.ones(3, bool)).items()
  }
  sums.update(steps=1.0, loss=0.0, loss_clean=0.0, loss_cmbcl=0.0, grad_norm=0.0)
  summary = diagnostics.epoch_summary(sums)
  assert np.isnan(summary["energy_noisy"]) and summary["selection_precision"] == 1.0


def test_check_finite_names_step_and_terms():
  diagnostics.check_finite({"loss": 1.0, "loss_clean": 0.5, "loss_cmbcl": 0.5}, 7, "ck")
  with pytest.raises(UserError, match=r"step 7 \(loss=inf, loss_clean=0\.5"):
    diagnostics.check_finite(
      {"loss": float("inf"), "loss_clean": 0.5, "loss_cmbcl": 0.5}, 7, "ck"
    )
