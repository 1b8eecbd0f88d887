"""benchmarks/plateau.py recovers window losses from the log and dates the exit.

The log is written here from a known per-step loss, as the training loop
prints it (the running mean since the epoch began, 4 decimals, every 10 steps
and at each epoch's end), so the windows and the exit step have exact answers.
"""

import numpy as np
import pytest
from scripts import load_benchmark

plateau = load_benchmark("plateau")

SPE, EVERY, K = 45, 10, 32


def log_text(step_losses):
  lines = [f"model SGR: 0.07M parameters; 1 training captions, {SPE} steps/epoch"]
  for done in range(1, len(step_losses) + 1):
    if done % EVERY and done % SPE:
      continue
    start = (done - 1) // SPE * SPE
    mean = np.mean(step_losses[start:done])
    lines.append(
      f"epoch {start // SPE + 1}/9 {done}/{len(step_losses)} steps, 9.00 steps/s, "
      f"ETA 0:01 | loss {mean:.4f} clean 1.00 prec 0.600 rec 1.000"
    )
  return "\n".join(lines)


def windows_of(step_losses):
  spe, points = plateau.parse_log(log_text(step_losses))
  assert spe == SPE
  return plateau.window_losses(points, spe)


def test_windows_are_the_means_between_logged_steps():
  rng = np.random.default_rng(0)
  losses = rng.uniform(5.0, 13.0, size=4 * SPE)
  windows = windows_of(losses)
  logged = [s for s in range(1, 4 * SPE + 1) if s % EVERY == 0 or s % SPE == 0]
  assert [s for s, _ in windows] == logged
  for (step, value), prev in zip(windows, [0] + logged):
    start = max(prev, (step - 1) // SPE * SPE)
    # Two means rounded to 4 decimals, each times at most SPE steps, over at
    # least one step.
    assert value == pytest.approx(losses[start:step].mean(), abs=2 * SPE * 5e-5)


def test_exit_is_the_first_step_after_which_the_loss_stays_low():
  losses = np.full(6 * SPE, 2 * K * 0.2)  # the plateau, 12.8
  losses[97:] = 6.0  # leaves after step 97; the window ending at 100 is mixed
  losses[150:155] = 12.8  # back on it inside the window (150, 160]
  val = [(SPE * e, 20.0 if e < 2 else 200.0) for e in range(1, 7)]
  threshold = 0.9 * 0.4
  per_anchor = [(s, v / K) for s, v in windows_of(losses)]
  assert dict(per_anchor)[160] == pytest.approx((5 * 12.8 + 5 * 6.0) / 10 / K, abs=1e-4)
  # (90, 100] averages 0.336 per anchor and (150, 160] 0.294, both under the
  # threshold, and (80, 90] 0.4: the final low stretch starts at step 100.
  assert plateau.plateau_exit(per_anchor, val, threshold, min_rsum=50.0) == 100
  # A validation rSum at the untrained level at epoch 3's end (135) moves the
  # exit to the first logged step after it.
  low_val = [(t, 20.0 if t <= 135 else r) for t, r in val]
  assert plateau.plateau_exit(per_anchor, low_val, threshold, min_rsum=50.0) == 140


def test_a_run_that_stays_on_the_plateau_has_no_exit():
  losses = np.full(3 * SPE, 12.8)
  losses[-5:] = 6.0  # a last window below: the rSum condition still fails
  per_anchor = [(s, v / K) for s, v in windows_of(losses)]
  val = [(SPE * e, 20.0) for e in range(1, 4)]
  assert plateau.plateau_exit(per_anchor, val, 0.36, min_rsum=50.0) is None


def test_without_a_loss_condition_only_the_rsum_counts():
  windows = [(s, 1.0) for s in range(10, 4 * SPE + 1, 10)]
  val = [(45, 30.0), (90, 80.0), (135, 40.0), (180, 90.0)]
  assert plateau.plateau_exit(windows, val, None, min_rsum=50.0) == 140
