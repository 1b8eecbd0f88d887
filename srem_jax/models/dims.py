"""Model dimensions: the paper's (`PAPER_DIMS`) and tiny ones for tests
(`TINY_DIMS`), and an SGRAF built at given dimensions without a config.

Benchmarks measure at the paper's dimensions; tests compile the same
programs at tiny ones.

    model = make_model("sgr", "float32", PAPER_DIMS, **plan.model_kwargs())
"""

from srem_jax.models.sgraf import DTYPES, SGRAF

# SGRAF on Flickr30K/COCO: BUTD region features, the SCAN vocabulary.
PAPER_DIMS = dict(
  img_dim=2048,
  num_regions=36,
  embed_dim=1024,
  word_dim=300,
  sim_dim=256,
  vocab_size=8481,
  sgr_steps=3,
)
TINY_DIMS = dict(
  img_dim=16,
  num_regions=4,
  embed_dim=16,
  word_dim=8,
  sim_dim=8,
  vocab_size=40,
  sgr_steps=3,
)


def make_model(head: str, dtype: str, dims: dict, **sizes) -> SGRAF:
  """SGRAF with `head`, `dtype` ("float32"/"bfloat16") and `dims`; `sizes`
  are the execution fields (an `Execution.model_kwargs()`, SGRAF's defaults
  for any left out)."""
  fields = {k: v for k, v in dims.items() if k != "num_regions"}
  return SGRAF(head=head, dtype=DTYPES[dtype], **fields, **sizes)
