"""Flickr30K (SCAN f30k_precomp features), 40 epochs, LR step at 30."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "flickr"
  c.data.name = "f30k_precomp"
  c.train.epochs = 40
  c.train.lr_decay_epochs = 30
  c.train.warmup_epochs = 5
  return c
