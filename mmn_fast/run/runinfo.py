"""What a run records about the software and the model it ran with."""
from __future__ import annotations

import platform

import safetensors
import torch
import transformers

from .. import __version__


def library_versions() -> dict[str, str]:
    """The versions of mmn_fast and the libraries that shape its numbers (recorded in run.json)."""
    return {"mmn_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}
