"""NCR's jitted steps (docs/ncr.md): the updates of one of its two models.

The loop in `srem_jax.train.co_training` holds the models' `TrainState`s and calls
these; like `srem_jax.train.step` for the other methods, nothing here reads data or
writes files. The learning rate is an argument (NCR sets it per epoch), so
the optimizer is Adam without one.

    tx = make_optimizer(config.train)
    carry = warmup_step((state, sums), batch, lr, model=..., tx=tx, mesh=mesh,
                        margin=0.2)
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from srem_jax.data import resident
from srem_jax.methods import ncr
from srem_jax.train import step

SUMMED = ("loss", "loss_labelled", "loss_unlabelled", "steps")


@dataclasses.dataclass(frozen=True)
class PerSampleLoss:
  """NCR's division statistic for `selection.pair_statistics`."""

  margin: float

  def __call__(self, scores, valid) -> dict:
    return {"loss": ncr.per_sample_loss(scores, self.margin, valid)}


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Clip and Adam without its learning rate: the step scales by it, as NCR
  sets it per epoch."""
  return optax.chain(
    optax.clip_by_global_norm(train_cfg.grad_clip), optax.scale_by_adam()
  )


def learning_rate(train_cfg, epoch: int) -> float:
  decayed = train_cfg.lr_decay_epochs > 0 and epoch >= train_cfg.lr_decay_epochs
  return train_cfg.lr * (train_cfg.lr_decay_factor if decayed else 1.0)


def unlabelled_from(config) -> int:
  """The first epoch (from 0, warm-up included) with the unlabelled loss."""
  co_epochs = config.train.epochs - config.train.warmup_epochs
  start = config.ncr.unlabelled_from_epoch
  return config.train.warmup_epochs + (co_epochs // 2 if start < 0 else start)


# ---- the jitted steps -------------------------------------------------------


def _images(batch, features, mesh):
  if features is None:
    return batch
  return {**batch, "images": resident.gather_images(features, batch["img_index"], mesh)}


def _eval_scores(model, state, batch, mesh):
  scores, _ = step.batch_scores(
    model,
    state.params,
    state.batch_stats,
    batch,
    train=False,
    rng=jax.random.PRNGKey(0),
    mesh=mesh,
  )
  return scores


def _update(state, batch, lr, loss_of_scores, *, model, tx, mesh):
  """One optimizer step of one model on `loss_of_scores(S)`."""
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    scores, batch_stats = step.batch_scores(
      model, params, state.batch_stats, batch, train=True, rng=rng, mesh=mesh
    )
    return loss_of_scores(scores), batch_stats

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  updates = jax.tree.map(lambda u: -lr * u, updates)
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    batch_stats=batch_stats,
    opt_state=opt_state,
  )
  return new_state, loss


def _add(sums, **values):
  values = {**values, "steps": 1.0}
  return {k: sums[k] + jnp.asarray(values.get(k, 0.0), sums[k].dtype) for k in sums}


def warmup_step(carry, batch, lr, *features, model, tx, mesh, margin):
  state, sums = carry
  batch = _images(batch, features[0] if features else None, mesh)
  update = functools.partial(_update, model=model, tx=tx, mesh=mesh)
  state, loss = update(state, batch, lr, lambda S: ncr.warmup_loss(S, margin))
  return state, _add(sums, loss=loss, loss_labelled=loss)


def co_train_step(
  carry, other, batches, lr, *features, model, tx, mesh, margin, kind, unlabelled
):
  """A labelled update and, with `unlabelled` (static), an unlabelled one.

  Both targets come from the models before either update, as in NCR.
  """
  state, sums = carry
  feats = features[0] if features else None
  labelled = _images(batches["l"], feats, mesh)
  update = functools.partial(_update, model=model, tx=tx, mesh=mesh)
  p_self = ncr.predict(_eval_scores(model, state, labelled, mesh), margin)
  prob = labelled["prob"]
  if unlabelled:
    batch_u = _images(batches["u"], feats, mesh)
    target_u = 0.5 * (
      ncr.predict(_eval_scores(model, state, batch_u, mesh), margin)
      + ncr.predict(_eval_scores(model, other, batch_u, mesh), margin)
    )
  state, loss_l = update(
    state, labelled, lr, lambda S: ncr.labelled_loss(S, prob, p_self, margin, kind)
  )
  loss_u = jnp.zeros((), loss_l.dtype)
  if unlabelled:
    state, loss_u = update(
      state, batch_u, lr, lambda S: ncr.unlabelled_loss(S, target_u, margin, kind)
    )
  sums = _add(sums, loss=loss_l + loss_u, loss_labelled=loss_l, loss_unlabelled=loss_u)
  return state, sums
