"""Edits: choose neurons, change their output vectors, save them as patch files, apply them live or bake them."""
from .methods import concept_neurons, make_edit, optimize, perturb, random_neurons, suppress, swap

__all__ = ["concept_neurons", "make_edit", "optimize", "perturb", "random_neurons", "suppress", "swap"]
