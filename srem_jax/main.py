"""Train SREM and test the best checkpoint: the project's main command.

    python -m srem_jax.main --config=configs/flickr.py [--workdir=DIR] \
        [--config.noise.ratio=0.4 ...]

Without --workdir the run lives in workdirs/<config name>; rerunning the same
command resumes there.
"""

import os

from absl import flags

from srem_jax import cli, distributed
from srem_jax.errors import UserError

_CONFIG = cli.define_config_flag()
_DISTRIBUTED = distributed.define_flags()
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run folder (default workdirs/<config name>); rerun to resume."
)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    raise UserError("--config is required, e.g. --config=configs/demo.py")
  distributed.initialize(*[flag.value for flag in _DISTRIBUTED])
  from srem_jax import train  # after flag parsing: jax starts here

  workdir = _WORKDIR.value or os.path.join("workdirs", config.name)
  train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  cli.run(main)
