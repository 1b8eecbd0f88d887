"""Readings of SREM's objective: what the paper's abstract leaves open, as data.

The abstract names SREM's parts; their exact forms are not published. Each
reading fixes the open choices below, and `config.loss.reading` picks one.
A component field of `config.loss` left at "" takes its value from the
reading; any other value overrides that one component, so a reading and a
single change to it stay one flag apart.

The choices, each beside the sentence of the abstract it interprets:

- `warmup` — SREM first trains on every pair before it filters any (the
  abstract's method starts from a model that already "fits clean samples"):
  RCL's complementary loss (`ccl`), NCR's mean-negative triplet
  (`triplet_mean`), or both added, the triplet summed over anchors as NCR
  does (`ccl+triplet_mean`) or averaged over them
  (`ccl+anchor_triplet_mean`); `warmup_triplet_weight` scales the triplet
  beside the complementary loss (1 unless a reading says otherwise).
- `selection` — "clean samples are filtered by their high similarity and low
  energy uncertainty": a rule inside each batch (`batch`: the partner is
  the arg-max both ways and the energy is at or below a batch quantile,
  which can never keep more than that quantile of a batch) or a per-epoch
  two-component mixture on each pair's in-batch cross-entropy and energy
  (`epoch_gmm`, how NCR and L2RM divide).
- `clean_loss`, `clean_negatives`, `clean_reduction` — "hard negative
  training" on the selected pairs, "viewing sample matching as
  classification tasks within the batch": the VSE++ triplet (hardest or
  mean negatives, summed over anchors or divided by the selected count) or
  the in-batch classification cross-entropy over S / tau (`ce`).
- `entropy_use` — "the sensitivity of selected clean samples ... in view of
  the overall prediction distribution" (the swapped entropy): a certainty
  weight, an NCR-style soft margin, or the inverse emphasis.

    options = resolve(config.loss)   # every component concrete
    options["clean_loss"]            # "ce" under reading r1
    options["warmup_triplet_weight"] # 0.1 under reading r8
"""

from srem_jax.methods import losses

# The component fields a reading fixes, with their allowed values.
COMPONENTS = {
  "warmup": losses.WARMUPS,
  "selection": losses.SELECTIONS,
  "clean_loss": losses.CLEAN_LOSSES,
  "clean_negatives": losses.NEGATIVES,
  "clean_reduction": losses.REDUCTIONS,
  "entropy_use": losses.ENTROPY_USES,
}
# A number a reading may fix; the config's value overrides it when >= 0.
TRIPLET_WEIGHT = "warmup_triplet_weight"

READINGS = {
  # The first reading: CMBCL's own special case as warm-up, the batch rule,
  # the reference's summed hardest-negative triplet weighted by certainty.
  "r0": dict(
    warmup="ccl",
    selection="batch",
    clean_loss="triplet",
    clean_negatives="hardest",
    clean_reduction="sum",
    entropy_use="weight",
  ),
  # Matching as in-batch classification: cross-entropy over S / tau on the
  # pairs a per-epoch mixture keeps, each weighted by its certainty, on
  # CMBCL's per-anchor scale.
  "r1": dict(
    warmup="ccl+triplet_mean",
    selection="epoch_gmm",
    clean_loss="ce",
    clean_negatives="hardest",
    clean_reduction="mean",
    entropy_use="weight",
  ),
  # Hard negatives with NCR-style soft margins: the hardest-negative triplet
  # per selected anchor, its margin scaled by the pair's certainty.
  "r2": dict(
    warmup="ccl+triplet_mean",
    selection="epoch_gmm",
    clean_loss="triplet",
    clean_negatives="hardest",
    clean_reduction="mean",
    entropy_use="margin",
  ),
  # Hard negatives on CMBCL's scale: the certainty-weighted hardest-negative
  # triplet divided by the selected count.
  "r3": dict(
    warmup="ccl+triplet_mean",
    selection="epoch_gmm",
    clean_loss="triplet",
    clean_negatives="hardest",
    clean_reduction="mean",
    entropy_use="weight",
  ),
  # Classification with the inverse emphasis: the selected pairs the two
  # modalities disagree on most weigh most.
  "r4": dict(
    warmup="ccl+triplet_mean",
    selection="epoch_gmm",
    clean_loss="ce",
    clean_negatives="hardest",
    clean_reduction="mean",
    entropy_use="inverse",
  ),
  # Classification inside each batch: r1's loss on the batch rule's pairs.
  "r5": dict(
    warmup="ccl+triplet_mean",
    selection="batch",
    clean_loss="ce",
    clean_negatives="hardest",
    clean_reduction="mean",
    entropy_use="weight",
  ),
  # r1 after a warm-up whose triplet is averaged over anchors: the
  # complementary loss keeps its weight in the warm-up's gradient.
  "r6": dict(
    warmup="ccl+anchor_triplet_mean",
    selection="epoch_gmm",
    clean_loss="ce",
    clean_negatives="hardest",
    clean_reduction="mean",
    entropy_use="weight",
  ),
  # r0's selected-pair phase after the same warm-up as r6.
  "r7": dict(
    warmup="ccl+anchor_triplet_mean",
    selection="batch",
    clean_loss="triplet",
    clean_negatives="hardest",
    clean_reduction="sum",
    entropy_use="weight",
  ),
  # r5's classification on the batch rule's pairs, after a warm-up led by
  # the complementary loss: the anchor-averaged mean-negative triplet enters
  # at a tenth of its weight, enough to leave the initial plateau, little
  # enough that the complementary loss, robust to mismatched pairs, sets the
  # direction once the model learns.
  "r8": dict(
    warmup="ccl+anchor_triplet_mean",
    warmup_triplet_weight=0.1,
    selection="batch",
    clean_loss="ce",
    clean_negatives="hardest",
    clean_reduction="mean",
    entropy_use="weight",
  ),
  # r8's selected-pair phase after the complementary loss alone: given a
  # warm-up long enough to leave the initial plateau on its own, r8's tenth
  # of a triplet slowed the climb after it at caption 40%, though it raised
  # the warm-up at 60% (docs/study/v5).
  "r9": dict(
    warmup="ccl",
    selection="batch",
    clean_loss="ce",
    clean_negatives="hardest",
    clean_reduction="mean",
    entropy_use="weight",
  ),
}


def resolve(loss_cfg) -> dict:
  """`loss_cfg.reading`'s components, each replaced by the config's own value
  where that is not "". Assumes `config_checks.validate_loss` passed."""
  reading = READINGS[loss_cfg["reading"]]
  resolved = {
    field: loss_cfg[field] if loss_cfg[field] != "" else reading[field]
    for field in COMPONENTS
  }
  weight = loss_cfg[TRIPLET_WEIGHT]
  resolved[TRIPLET_WEIGHT] = weight if weight >= 0 else reading.get(TRIPLET_WEIGHT, 1.0)
  return resolved
