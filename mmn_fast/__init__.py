"""mmn_fast: find and edit multi-modal neurons in vision-language models.

    engine = mmn_fast.load("path/to/checkpoint")
    results = engine.find(images, concepts="nouns", top_k=50)
"""
from .adapters import ModelSpec, register_adapter
from .aggregate import open_results
from .engine import DEFAULT_PROMPT, Engine, FindOptions, load
from .errors import MMNError
from .live import PatchHandle, apply_patch
from .patch import Patch, load_patch
from .results import ConceptResult, ImageResult

__version__ = "0.1.0"
__all__ = ["load", "open_results", "Engine", "FindOptions", "ModelSpec", "register_adapter", "MMNError",
           "ConceptResult", "ImageResult", "DEFAULT_PROMPT", "__version__",
           "apply_patch", "load_patch", "Patch", "PatchHandle"]
