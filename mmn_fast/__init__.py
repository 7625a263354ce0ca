"""mmn_fast: find and edit multi-modal neurons in vision-language models.

    engine = mmn_fast.load("path/to/checkpoint")
    results = engine.find(images, concepts="nouns", top_k=50)
"""
__version__ = "0.1.0"  # first: modules imported below read it

from .edit.export import export_peft
from .errors import MMNError
from .find.engine import DEFAULT_PROMPT, Engine, FindOptions, load
from .find.results import ConceptResult, ImageResult
from .model.adapters import ModelSpec, register_adapter
from .model.live import PatchHandle, apply_patch
from .model.patch_file import Patch, load_patch
from .run.aggregate import open_results

__all__ = ["load", "open_results", "Engine", "FindOptions", "ModelSpec", "register_adapter", "MMNError",
           "ConceptResult", "ImageResult", "DEFAULT_PROMPT", "__version__",
           "apply_patch", "load_patch", "Patch", "PatchHandle", "export_peft"]
