"""What a study trains: its settings (noise condition x method) and each run's config."""

import copy
import dataclasses

METHODS = ("srem", "triplet_hardest", "ccl", "ncr")
ABLATIONS = {
  "srem w/o filtration": {"loss.use_filtration": False},
  "srem w/o entropy weight": {"loss.use_entropy_weight": False},
  "srem beta=0": {"loss.beta": 0.0},
  "srem w/o CMBCL": {"loss.use_cmbcl": False},
}
# One factor of SREM's clean-sample phase changed at a time: which of them lets
# SREM keep improving after warm-up as ccl does.
CLEAN_PHASE = {
  "srem beta=0": ABLATIONS["srem beta=0"],
  "srem mean-reduced triplet": {"loss.clean_reduction": "mean"},
  "srem mean negatives": {"loss.clean_negatives": "mean"},
  "srem margin=0.05": {"loss.margin": 0.05},
  "srem no LR drop": {"train.lr_decay_factor": 1.0},
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One cell of the study: a noise condition and a method (one run per seed)."""

  protocol: str
  ratio: float
  method: str
  overrides: tuple = ()

  @property
  def label(self) -> str:
    return f"{self.protocol} {round(self.ratio * 100)}%"

  def run_name(self, seed: int) -> str:
    method = self.method.replace(" w/o ", "_no_").replace(" ", "_").replace("=", "")
    return f"{self.protocol}{self.ratio:g}_{method}_s{seed}".lower()


def reading_method(reading: str) -> str:
  """The study's name for SREM under one reading (`srem_jax.methods.readings`)."""
  return f"srem {reading}"


def plan(
  ratios,
  methods,
  image_ratios=(0.4,),
  ablation_ratios=(0.6,),
  clean_phase_ratios=(),
  readings=(),
) -> list[Setting]:
  """Every setting, in run order; SREM under each of `readings` at every
  noise condition, SREM's ablations at each of `ablation_ratios` and its
  clean-phase factors (`CLEAN_PHASE`) at each of `clean_phase_ratios`."""
  overrides = {m: (("loss.name", m),) for m in methods}
  for reading in readings:
    overrides[reading_method(reading)] = (
      ("loss.name", "srem"),
      ("loss.reading", reading),
    )
  settings = [
    Setting("caption", r, m, fields) for r in ratios for m, fields in overrides.items()
  ]
  settings += [
    Setting("image", r, m, fields)
    for r in image_ratios
    for m, fields in overrides.items()
  ]
  if "srem" in methods:
    settings += [
      Setting("caption", r, name, tuple(fields.items()))
      for r in ablation_ratios
      for name, fields in ABLATIONS.items()
    ]
    settings += [
      Setting("caption", r, name, tuple(fields.items()))
      for r in clean_phase_ratios
      for name, fields in CLEAN_PHASE.items()
    ]
  # An ablation that is also a clean-phase factor at the same ratio runs once.
  return list(dict.fromkeys(settings))


def run_config(base, setting: Setting, seed: int, data_dir: str):
  config = copy.deepcopy(base)
  config.name = setting.run_name(seed)
  config.data.raw_dir = data_dir
  config.noise.protocol, config.noise.ratio = setting.protocol, setting.ratio
  config.noise.seed = config.train.seed = seed
  for key, value in setting.overrides:
    group, field = key.split(".")
    config[group][field] = value
  return config
