"""Edits: choose neurons, change their output vectors, save them as patch files, apply them live or bake them."""
from .methods import OptimizeOptions, concept_neurons, make_edit, optimize, perturb, random_neurons, suppress, swap

__all__ = ["OptimizeOptions", "concept_neurons", "make_edit", "optimize", "perturb", "random_neurons", "suppress",
           "swap"]
