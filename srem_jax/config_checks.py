"""Start-up validation of a whole config, before any work or any write.

Every rule on a config value lives here; the code that reads a value relies
on it. Every message names the key, the value found and what is allowed, so a
mistake costs one line instead of a crash an hour into a run. `validate`
checks the config alone; `validate_data` the fields that depend on the
prepared data, once it is opened.

    config_checks.validate(config, jax.device_count())
    config_checks.validate_data(config, train=..., val=..., test=...)
"""

import math

from srem_jax import execution, padding
from srem_jax.errors import UserError
from srem_jax.methods import losses, ncr, readings
from srem_jax.models.heads import REMAT_MODES
from srem_jax.models.numerics import PRECISIONS

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
  "profile.start_step": (0, math.inf, True, True),
  "profile.num_steps": (0, math.inf, True, True),
}
_BOOLEANS = ("data.features_on_device",)


def _get(config, key):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def validate(config, num_devices: int | None = None, process_count: int = 1) -> None:
  """Raises UserError for the first invalid field found; with `num_devices`,
  also the fields that must fit the devices (`mesh.data`, the batch)."""
  for key in _BOOLEANS:
    check_boolean(config, key)
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
  validate_loss(config.loss)
  validate_ncr(config.ncr)
  validate_execution(config.execution)
  if config.train.warmup_epochs > config.train.epochs:
    raise UserError(
      f"config train.warmup_epochs={config.train.warmup_epochs} exceeds "
      f"train.epochs={config.train.epochs}"
    )
  if not config.data.name or "/" in config.data.name:
    raise UserError(f"config data.name={config.data.name!r}: must be a folder name")
  if num_devices is not None:
    devices = check_mesh(config.mesh.data, num_devices, process_count)
    check_batch_divisible(config.train.batch_size, devices)


def check_mesh(mesh_data: int, num_devices: int, process_count: int = 1) -> int:
  """The devices of the data axis `mesh.data` asks for among `num_devices`."""
  if mesh_data != -1 and not 1 <= mesh_data <= num_devices:
    raise UserError(
      f"config mesh.data={mesh_data}: must be -1 (all) or 1..{num_devices} devices"
    )
  if mesh_data not in (-1, num_devices) and process_count > 1:
    raise UserError(
      f"config mesh.data={mesh_data}: a multi-process run uses all "
      f"{num_devices} devices; set mesh.data=-1"
    )
  return num_devices if mesh_data == -1 else mesh_data


def check_batch_divisible(batch_size: int, devices: int) -> None:
  if batch_size % devices:
    raise UserError(
      f"config train.batch_size={batch_size} must be divisible by the "
      f"{devices} devices of the data axis; use a multiple of {devices}"
    )


def check_batch_fits(batch_size: int, n_captions: int) -> None:
  """An epoch needs one whole batch of training captions."""
  if batch_size > n_captions:
    raise UserError(
      f"config train.batch_size={batch_size} exceeds the {n_captions} training captions"
    )


def validate_execution(exec_cfg) -> None:
  """`config.execution` (a mapping; None = every default), as
  `execution.resolve` reads it."""
  get = (lambda k, d: d) if exec_cfg is None else (lambda k, d: exec_cfg.get(k, d))
  name = get("preset", "auto")
  if name not in execution.PRESET_NAMES:
    raise UserError(
      f"config execution.preset={name!r}: must be one of "
      f"{', '.join(execution.PRESET_NAMES)}"
    )
  precision = get("matmul_precision", "highest")
  if precision not in PRECISIONS:
    raise UserError(
      f"config execution.matmul_precision={precision!r}: must be one of "
      f"{', '.join(PRECISIONS)}"
    )
  for key in ("img_chunk", "cap_chunk", "length_group", "img_tile", "cap_tile"):
    value = get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise UserError(
        f"config execution.{key}={value!r}: must be a positive integer "
        "(0 = the preset's)"
      )
  remat = get("remat", "")
  if remat and remat not in REMAT_MODES:
    raise UserError(
      f"config execution.remat={remat!r}: must be one of {', '.join(REMAT_MODES)} "
      "or '' (the preset's)"
    )
  by_length = get("by_length", True)
  if not isinstance(by_length, bool):
    raise UserError(f"config execution.by_length={by_length!r}: must be True or False")


def check_boolean(config, key: str) -> bool:
  value = _get(config, key)
  if not isinstance(value, bool):
    raise UserError(f"config {key}={value!r}: must be True or False")
  return value


def validate_data(config, *, train, val, test) -> None:
  """The fields that must fit the prepared splits (`PreparedSplit`s) opened."""
  if train.feature_dim != config.model.img_dim:
    raise UserError(
      f"config model.img_dim={config.model.img_dim} but the features of "
      f"{config.data.name} have width {train.feature_dim}"
    )
  longest = max(s.max_caption_len for s in (train, val, test))
  padding.static_length(longest, config.data.caption_len)
  n_val = config.data.val_images or val.n_images
  if n_val > val.n_images:
    raise UserError(
      f"config data.val_images={n_val} but split {config.data.val_split!r} has "
      f"only {val.n_images} images"
    )
  check_batch_fits(config.train.batch_size, train.n_captions)


def _number(loss_cfg, field, accept, expected):
  if field not in loss_cfg:
    raise UserError(f"loss.{field}: missing from the config")
  value = loss_cfg[field]
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not (is_number and math.isfinite(value) and accept(value)):
    raise UserError(f"loss.{field}: expected {expected}, got {value!r}")
  return value


def validate_loss(loss_cfg) -> None:
  """Raises UserError naming `loss.<field>` for the first bad value in `loss_cfg`."""
  choices = {
    "name": (*losses.LOSS_NAMES, ncr.NAME),
    "reading": tuple(readings.READINGS),
    "bias": losses.BIASES,
  }
  # A reading's component left at "" takes the reading's value.
  choices.update({k: ("", *v) for k, v in readings.COMPONENTS.items()})
  for field, allowed in choices.items():
    value = loss_cfg[field] if field in loss_cfg else None
    if value not in allowed:
      shown = ", ".join(repr(a) if a == "" else a for a in allowed)
      raise UserError(f"loss.{field}: expected one of {shown}, got {value!r}")
  _number(
    loss_cfg,
    readings.TRIPLET_WEIGHT,
    lambda v: v >= 0 or v == -1,
    "a number >= 0, or -1 for the reading's",
  )
  resolved = readings.resolve(loss_cfg)
  if resolved["entropy_use"] == "margin" and resolved["clean_loss"] != "triplet":
    raise UserError(
      "loss.entropy_use: 'margin' scales a triplet margin and needs "
      f"loss.clean_loss 'triplet', got {resolved['clean_loss']!r} (reading "
      f"{loss_cfg['reading']!r})"
    )
  for field in ("use_filtration", "use_entropy_weight", "use_cmbcl"):
    value = loss_cfg[field] if field in loss_cfg else None
    if not isinstance(value, bool):
      raise UserError(f"loss.{field}: expected True or False, got {value!r}")
  _number(loss_cfg, "tau", lambda v: v > 0, "a number > 0")
  _number(loss_cfg, "energy_temp", lambda v: v > 0, "a number > 0")
  _number(loss_cfg, "margin", lambda v: v >= 0, "a number >= 0")
  _number(loss_cfg, "clean_quantile", lambda v: 0 < v <= 1, "a number in (0, 1]")
  _number(loss_cfg, "beta", lambda v: 0 <= v <= 1, "a number in [0, 1]")
  _number(loss_cfg, "cmbcl_weight", lambda v: v >= 0, "a number >= 0")
  _number(loss_cfg, "eps", lambda v: 0 <= v < 1, "a number in [0, 1)")
  _number(
    loss_cfg,
    "gmm_iters",
    lambda v: isinstance(v, int) and v >= 1,
    "an integer >= 1",
  )
  _number(loss_cfg, "gmm_tol", lambda v: v >= 0, "a number >= 0")
  _number(loss_cfg, "gmm_reg", lambda v: v > 0, "a number > 0")
  _number(loss_cfg, "gmm_min_noisy", lambda v: 0 <= v < 1, "a number in [0, 1)")


def validate_ncr(ncr_cfg) -> None:
  """Raises UserError naming `ncr.<field>` for the first bad value."""
  if ncr_cfg.soft_margin not in ncr.SOFT_MARGINS:
    raise UserError(
      f"ncr.soft_margin: expected one of {', '.join(ncr.SOFT_MARGINS)}, "
      f"got {ncr_cfg.soft_margin!r}"
    )
  threshold = ncr_cfg.p_threshold
  if (
    isinstance(threshold, bool)
    or not isinstance(threshold, (int, float))
    or not (0 <= threshold < 1)
  ):
    raise UserError(f"ncr.p_threshold: expected a number in [0, 1), got {threshold!r}")
  start = ncr_cfg.unlabelled_from_epoch
  if isinstance(start, bool) or not isinstance(start, int) or start < -1:
    raise UserError(
      f"ncr.unlabelled_from_epoch: expected an integer >= 0, or -1 (half of the "
      f"co-training epochs), got {start!r}"
    )
