"""Training: a run's bookkeeping (`run`), the update steps (`step`, `ncr_step`),
the epoch selection (`selection`) and one loop per method (`srem` for SREM and
the single-model baselines, `co_training` for NCR's two models).

    results = train.train_and_evaluate(config, workdir="workdirs/demo")
"""


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config`'s method in `workdir` (resuming from its checkpoint) and
  tests the best model; the loops are imported here, on use, so importing a
  step module does not load the data stack."""
  if config.loss.name == "ncr":  # two models and their own loop
    from srem_jax.train import co_training

    return co_training.train_and_evaluate(config, workdir)
  from srem_jax.train import srem

  return srem.train_and_evaluate(config, workdir)
