"""Retrieval evaluation: the evaluator, all-pairs scoring on the devices, recalls."""
