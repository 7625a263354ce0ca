"""Scoring ops of mmn_fast, importable as `mmn_fast.kernels`.

Each op has a pure-torch implementation (the CPU path and the test reference) and, where it pays,
a Triton kernel behind `backend="triton"`. Importing this package never imports triton or touches
CUDA: the kernel modules (`_*_triton.py`) are imported by their launchers when first called.

The op modules live in the repository's top-level `kernels/` folder. That folder has no
`__init__.py`, so it is never a top-level `kernels` package (the name belongs to Hugging Face's
`kernels`, which transformers imports): at most a PEP 420 namespace portion, which loses to any
installed package of that name. From a checkout (`PYTHONPATH=.` or an editable install) the folder
is on this package's path; a built wheel carries its modules here (setup.py's `build_py`).
"""
import os as _os

_SOURCES = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))), "kernels")
if _os.path.isfile(_os.path.join(_SOURCES, "_act_score_triton.py")) and _SOURCES not in __path__:
    __path__.append(_SOURCES)

from ._act_score_common import ActScoreOut, ActScorePlans
from ._triton_util import interpreter_on, triton_available
from .act_score import act_score, act_score_torch, act_score_triton
from .contribution import contribution_scores, token_projection, topk_neurons
from .neuron_delta import NeuronDeltas, neuron_delta, neuron_delta_torch, neuron_delta_triton
from .vocab_topk import VocabTopK, vocab_topk, vocab_topk_torch, vocab_topk_triton

__all__ = [
    "ActScoreOut",
    "ActScorePlans",
    "VocabTopK",
    "act_score",
    "act_score_torch",
    "act_score_triton",
    "contribution_scores",
    "interpreter_on",
    "NeuronDeltas",
    "neuron_delta",
    "neuron_delta_torch",
    "neuron_delta_triton",
    "token_projection",
    "topk_neurons",
    "triton_available",
    "vocab_topk",
    "vocab_topk_torch",
    "vocab_topk_triton",
]
