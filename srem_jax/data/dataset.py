"""Everything a run needs from the data, opened from a config.

Owns the start-up sequence: generate the synthetic dataset when the config
asks for it, prepare the ArrayRecord copy when it is missing, open the
train/validation/test splits and resolve the noisy correspondences. When the
features are missing it says where it looked and what layout it expects.

    data = dataset.open_data(config, workdir, log=print)
    data.train.n_captions, data.noise.t2i, data.val_images
"""

import dataclasses
import os
from typing import Callable

import jax
from jax.experimental import multihost_utils

from srem_jax import config_checks, padding
from srem_jax.data import layout, noise, prepare, prepared_split, synthetic
from srem_jax.errors import UserError

_LAYOUT_HELP = (
  "expected the SCAN precomp layout: <raw_dir>/<name>/{split}_ims.npy "
  "(float32 N x regions x dim) with {split}_caps.txt (5 lines per image) or "
  "{split}_caps.tsv, and the vocabulary <raw_dir>/vocab/<name>_vocab.json "
  "(or data.vocab_path). To try the code without real features run "
  "`python -m srem_jax.main --config=configs/demo.py`, which uses the embedded "
  "synthetic dataset"
)


@dataclasses.dataclass
class RunData:
  train: prepared_split.PreparedSplit
  val: prepared_split.PreparedSplit
  test: prepared_split.PreparedSplit
  noise: noise.Noise
  caption_len: int  # the static padded length (model init, evaluation embeddings)
  buckets: tuple[int, ...]  # lengths a training batch may be padded to
  val_images: int  # images of the validation split used every epoch
  vocab_size: int
  prepared_dir: str


def prepared_dir_for(data_cfg) -> str:
  return data_cfg.prepared_dir or os.path.join(data_cfg.raw_dir, "prepared")


def ensure_prepared(data_cfg, log: Callable[[str], None], progress=None) -> str:
  """Generates (synthetic) and prepares the dataset if needed; returns its dir.

  `progress` is the config's `progress` section (None = no progress lines).
  """
  raw_folder = os.path.join(data_cfg.raw_dir, data_cfg.name)
  prepared_dir = prepared_dir_for(data_cfg)
  splits = sorted({data_cfg.train_split, data_cfg.val_split, data_cfg.test_split})
  if prepare.is_prepared(prepared_dir, data_cfg.name, splits):
    return prepared_dir
  if not os.path.isdir(raw_folder) and data_cfg.synthetic.enabled:
    syn = data_cfg.synthetic
    log(f"generating the synthetic dataset into {raw_folder} (seed {syn.seed})")
    # The config's synthetic fields are the generator's keyword arguments.
    sizes = {k: v for k, v in syn.items() if k != "enabled"}
    synthetic.generate(data_cfg.raw_dir, name=data_cfg.name, **sizes)
  if not os.path.isdir(raw_folder):
    raise UserError(
      f"no dataset at {os.path.abspath(raw_folder)} (data.raw_dir="
      f"{data_cfg.raw_dir!r}, data.name={data_cfg.name!r}) and no prepared copy "
      f"at {os.path.abspath(prepared_dir)}; {_LAYOUT_HELP}"
    )
  vocab_path = layout.resolve_vocab_path(
    data_cfg.raw_dir, data_cfg.name, data_cfg.vocab_path
  )
  if not os.path.isfile(vocab_path):
    raise UserError(f"vocabulary file {vocab_path} not found; {_LAYOUT_HELP}")
  log(f"preparing {raw_folder} into {prepared_dir} (once; later runs reuse it)")
  prepare.prepare(
    data_cfg.raw_dir,
    data_cfg.name,
    vocab_path,
    prepared_dir,
    splits,
    log=log,
    progress=progress is not None and progress.enabled,
    progress_delay_s=progress.delay_s if progress is not None else 0.0,
  )
  return prepared_dir


def _on_process_zero_first(fn):
  """Runs `fn` on process 0, then on the others once it has finished.

  Generating, preparing and writing the noise file touch shared storage; the
  other processes then only find and read what process 0 wrote.
  """
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    result = fn()
  multihost_utils.sync_global_devices("srem_jax data ready")
  if jax.process_index() != 0:
    result = fn()
  return result


def open_data(config, workdir: str, log: Callable[[str], None] = print) -> RunData:
  data_cfg = config.data
  prepared_dir = _on_process_zero_first(
    lambda: ensure_prepared(data_cfg, log, config.progress)
  )
  train = prepared_split.load_prepared(
    prepared_dir, data_cfg.name, data_cfg.train_split
  )
  val = prepared_split.load_prepared(prepared_dir, data_cfg.name, data_cfg.val_split)
  test = prepared_split.load_prepared(prepared_dir, data_cfg.name, data_cfg.test_split)
  config_checks.validate_data(config, train=train, val=val, test=test)
  caption_len = padding.static_length(
    max(s.max_caption_len for s in (train, val, test)), data_cfg.caption_len
  )
  n_val = data_cfg.val_images or val.n_images
  run_noise = _on_process_zero_first(
    lambda: noise.resolve_noise(
      ratio=config.noise.ratio,
      protocol=config.noise.protocol,
      seed=config.noise.seed,
      file=config.noise.file,
      n_caps=train.n_captions,
      n_imgs=train.n_images,
      caps_per_image=train.caps_per_image,
      workdir=workdir,
    )
  )
  return RunData(
    train=train,
    val=val,
    test=test,
    noise=run_noise,
    caption_len=caption_len,
    buckets=padding.bucket_lengths(caption_len, data_cfg.caption_len),
    val_images=n_val,
    vocab_size=train.vocab_size,
    prepared_dir=prepared_dir,
  )
