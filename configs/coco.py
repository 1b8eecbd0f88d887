"""MS-COCO (SCAN coco_precomp), 20 epochs, LR step at 10, tested on testall."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "coco"
  c.data.name = "coco_precomp"
  c.data.test_split = "testall"
  c.data.eval_protocol = "coco"
  c.train.epochs = 20
  c.train.lr_decay_epochs = 10
  c.train.warmup_epochs = 10
  return c
