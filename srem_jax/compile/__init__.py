"""Compiling a run's programs for a GPU or TPU without one: targets, data shapes."""
