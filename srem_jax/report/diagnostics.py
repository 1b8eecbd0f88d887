"""Selection diagnostics of a run, measured against the injected noise.

The hidden clean/noisy truth of every training pair never enters the loss;
here it scores the clean-sample selection (precision, recall, selected
fraction) and splits the energy and swapped entropy into truly clean and truly
noisy means. `selection_sums` runs inside the jitted step; `epoch_summary`
turns an epoch's accumulated sums into the numbers written to metrics.jsonl.
`pair_values` and `PairCollector` keep every pair's values of an epoch for
its histograms.

    sums = selection_sums(aux, batch["truly_clean"])  # per step, on device
    summary = epoch_summary(accumulated_sums)       # per epoch, on the host
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from srem_jax.errors import UserError


def selection_sums(aux, truly_clean) -> dict:
  """Per-batch sums from which epoch precision/recall and means are formed.

  `aux["clean"]` is the mask the loss trained as clean (`trained_clean`),
  `truly_clean` the injected truth; the selection is scored as the first
  against the second."""
  chosen = aux["clean"].astype(jnp.float32)
  truth = truly_clean.astype(jnp.float32)
  return {
    "n": jnp.asarray(truth.shape[0], jnp.float32),
    "trained_clean": chosen.sum(),
    "trained_truly_clean": (chosen * truth).sum(),
    "truly_clean": truth.sum(),
    "energy_clean": (aux["energy"] * truth).sum(),
    "energy_noisy": (aux["energy"] * (1 - truth)).sum(),
    "entropy_clean": (aux["entropy"] * truth).sum(),
    "entropy_noisy": (aux["entropy"] * (1 - truth)).sum(),
  }


def pair_values(aux, truly_clean) -> dict:
  """Each pair's energy, swapped entropy and injected-noise truth, shape (K,)."""
  return {
    "energy": aux["energy"],
    "entropy": aux["entropy"],
    "truly_clean": truly_clean.astype(bool),
  }


class PairCollector:
  """The `pair_values` of an epoch's steps, as host arrays at its end.

  Steps hand in device arrays; `flush` moves them to the host where the loop
  waits for the device anyway (its progress line), so collecting adds no
  wait of its own and device memory holds at most the steps since the last.
  """

  def __init__(self):
    self.pending, self.on_host = [], []

  def add(self, pairs: dict) -> None:
    self.pending.append(pairs)

  def flush(self) -> None:
    self.on_host.extend(jax.device_get(self.pending))
    self.pending = []

  def arrays(self) -> dict[str, np.ndarray]:
    """Every collected pair, in step order (at least one step was added)."""
    self.flush()
    return {
      key: np.concatenate([np.asarray(p[key]) for p in self.on_host])
      for key in self.on_host[0]
    }


def epoch_summary(sums: dict) -> dict:
  """Epoch diagnostics from accumulated `selection_sums` and loss sums."""
  s = {k: float(v) for k, v in sums.items()}
  steps = max(s.pop("steps"), 1.0)
  truly_clean, chosen = s["truly_clean"], s["trained_clean"]
  noisy = s["n"] - truly_clean
  out = {k: s[k] / steps for k in ("loss", "loss_clean", "loss_cmbcl", "grad_norm")}
  out.update(
    selected_frac=chosen / max(s["n"], 1),
    selection_precision=s["trained_truly_clean"] / chosen if chosen else 0.0,
    selection_recall=s["trained_truly_clean"] / truly_clean if truly_clean else 0.0,
    energy_clean=s["energy_clean"] / truly_clean if truly_clean else math.nan,
    energy_noisy=s["energy_noisy"] / noisy if noisy else math.nan,
    entropy_clean=s["entropy_clean"] / truly_clean if truly_clean else math.nan,
    entropy_noisy=s["entropy_noisy"] / noisy if noisy else math.nan,
  )
  return out


def check_finite(summary: dict, step: int, ckpt_dir: str) -> None:
  terms = {k: summary[k] for k in ("loss", "loss_clean", "loss_cmbcl")}
  if all(math.isfinite(v) for v in terms.values()):
    return
  text = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
  raise UserError(
    f"non-finite loss by step {step} ({text}); the last good checkpoint in "
    f"{ckpt_dir} is kept: rerun the same command with a lower learning rate, "
    "e.g. --config.train.lr=1e-4, to resume from it"
  )
