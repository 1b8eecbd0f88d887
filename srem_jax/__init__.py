"""SREM for image-text retrieval under noisy correspondences, in JAX/Flax."""

__version__ = "0.1.0"
