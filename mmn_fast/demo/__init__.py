"""The demo model: a tiny LLaVA trained on CPU to caption synthetic coloured shapes.

    from mmn_fast.demo import build_demo_model
    path = build_demo_model()          # trains once (about a minute), then reuses the cache
    engine = mmn_fast.load(path)
"""
from .build import DEMO_PROMPT, build_demo_model, default_cache_dir
from .data import COLOURS, SHAPES, make_examples, save_examples

__all__ = ["build_demo_model", "make_examples", "save_examples", "DEMO_PROMPT", "COLOURS", "SHAPES",
           "default_cache_dir"]
