"""CC152K (real noise, one caption per image): no synthetic noise is added."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "cc152k"
  c.data.name = "cc152k_precomp"
  c.data.val_images = 0
  c.noise.ratio = 0.0
  c.train.epochs = 40
  c.train.lr_decay_epochs = 30
  c.train.warmup_epochs = 10
  return c
