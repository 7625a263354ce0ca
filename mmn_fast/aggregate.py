"""Old import path of `mmn_fast.run.aggregate` (documented for `NeuronStats`), kept for users' code."""
from .run.aggregate import NeuronStats, open_results

__all__ = ["NeuronStats", "open_results"]
