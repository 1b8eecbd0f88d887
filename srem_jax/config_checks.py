"""Start-up validation of a whole config, before any work or any write.

Every message names the key, the value found and what is allowed, so a
mistake costs one line instead of a crash an hour into a run.

    config_checks.validate(config)   # raises UserError
"""

import math

from srem_jax import execution, losses
from srem_jax.errors import UserError

_CHOICES = {
  "data.eval_protocol": ("full", "coco"),
  "noise.protocol": ("caption", "image"),
  "model.head": ("sgr", "saf"),
  "model.dtype": ("float32", "bfloat16"),
}
# key -> (lowest, highest, lowest allowed, highest allowed)
_RANGES = {
  "noise.ratio": (0.0, 1.0, True, False),
  "model.img_dim": (1, math.inf, True, True),
  "model.embed_dim": (1, math.inf, True, True),
  "model.word_dim": (1, math.inf, True, True),
  "model.sim_dim": (1, math.inf, True, True),
  "model.sgr_steps": (1, math.inf, True, True),
  "model.dropout": (0.0, 1.0, True, False),
  "model.smooth": (0.0, math.inf, False, True),
  "train.epochs": (1, math.inf, True, True),
  "train.warmup_epochs": (0, math.inf, True, True),
  "train.batch_size": (2, math.inf, True, True),
  "train.lr": (0.0, math.inf, False, True),
  "train.lr_decay_epochs": (0, math.inf, True, True),
  "train.lr_decay_factor": (0.0, 1.0, False, True),
  "train.grad_clip": (0.0, math.inf, False, True),
  "train.log_every_steps": (1, math.inf, True, True),
  "train.steps_per_epoch": (0, math.inf, True, True),
  "train.checkpoint_every_steps": (0, math.inf, True, True),
  "data.val_images": (0, math.inf, True, True),
  "data.caption_len": (0, math.inf, True, True),
  "data.num_workers": (0, math.inf, True, True),
  "eval.batch_size": (1, math.inf, True, True),
  "progress.delay_s": (0.0, math.inf, True, True),
}


def _get(config, key):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def validate(config, num_devices: int | None = None) -> None:
  """Raises UserError for the first invalid field found."""
  for key, allowed in _CHOICES.items():
    value = _get(config, key)
    if value not in allowed:
      raise UserError(f"config {key}={value!r}: must be one of {', '.join(allowed)}")
  for key, (low, high, low_ok, high_ok) in _RANGES.items():
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise UserError(f"config {key}={value!r}: must be a number")
    if not math.isfinite(value) and high != math.inf:
      raise UserError(f"config {key}={value!r}: must be finite")
    too_low = value < low or (value == low and not low_ok)
    too_high = value > high or (value == high and not high_ok)
    if too_low or too_high:
      lo = "[" if low_ok else "("
      hi = "]" if high_ok else ")"
      raise UserError(f"config {key}={value!r}: must be in {lo}{low}, {high}{hi}")
  losses.validate_loss_config(config.loss)
  execution.resolve(config.execution)  # raises for a bad preset, size or precision
  if config.train.warmup_epochs > config.train.epochs:
    raise UserError(
      f"config train.warmup_epochs={config.train.warmup_epochs} exceeds "
      f"train.epochs={config.train.epochs}"
    )
  if not config.data.name or "/" in config.data.name:
    raise UserError(f"config data.name={config.data.name!r}: must be a folder name")
  mesh_data = config.mesh.data
  if num_devices is not None:
    if mesh_data != -1 and not 1 <= mesh_data <= num_devices:
      raise UserError(
        f"config mesh.data={mesh_data}: must be -1 (all) or 1..{num_devices} devices"
      )
    devices = num_devices if mesh_data == -1 else mesh_data
    if config.train.batch_size % devices:
      raise UserError(
        f"config train.batch_size={config.train.batch_size} must be divisible by "
        f"the {devices} devices of the data axis"
      )
