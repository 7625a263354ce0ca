"""What a run records about the software and the model it ran with, and checks of a model against it."""
from __future__ import annotations

import hashlib
import json
import platform
import warnings
from pathlib import Path

import safetensors
import torch
import transformers

from .. import __version__
from ..errors import MMNError
from .aggregate import outside_run


def library_versions() -> dict[str, str]:
    """The versions of mmn_fast and the libraries that shape its numbers (recorded in run.json)."""
    return {"mmn_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------------- run <-> model
class RunModelWarning(UserWarning):
    """The loaded model's weights are not those a find run recorded (same shapes: results may not match)."""


def model_name(engine) -> str:
    """How an engine's model is named in messages and metrics.json: its source, else its class."""
    return str(engine.source or type(engine.model).__name__)


def run_fingerprint(res) -> str | None:
    """The weight fingerprint a find run recorded (run.json, else DIR/parts/config.json when that is
    a regular file inside the run)."""
    fp = res.run.get("weight_fingerprint")
    config = Path(res.path) / "parts" / "config.json"
    if not fp and outside_run(res.path, config) is None:
        try:
            fp = json.loads(config.read_text()).get("weight_fingerprint")
        except (OSError, ValueError, AttributeError):
            fp = None
    return fp if isinstance(fp, str) and fp else None


def check_run_model(res, engine, what: str = "this run") -> str | None:
    """Refuse an engine whose decoder is not shaped like the one the run in `res` (open_results) was
    scored on: its neuron indices would be out of range or mean other neurons. With the same shapes but
    other weights (fingerprint) warn (RunModelWarning) and return the warning's text; else None."""
    run = res.run
    ad = engine.adapter
    rec = run.get("adapter") or {}
    n_layers, d_mlp = rec.get("n_layers"), rec.get("d_mlp")
    if n_layers is None or d_mlp is None:  # older runs: the aggregates' shape
        try:
            n_layers, d_mlp = res.stats.n_layers, res.stats.d_mlp
        except Exception:  # noqa: BLE001 - nothing recorded: nothing to compare
            n_layers = d_mlp = None
    run_model = run.get("model", "?")
    if n_layers is not None and d_mlp is not None and (int(n_layers), int(d_mlp)) != (ad.n_layers, ad.d_mlp):
        raise MMNError(f"the run in '{res.path}' was scored on '{run_model}' ({n_layers} layers x {d_mlp} MLP "
                       f"neurons), but the loaded model '{model_name(engine)}' has {ad.n_layers} x {ad.d_mlp}: the "
                       f"run's neuron indices do not fit it. Load the run's checkpoint ('{run_model}'; mmn metrics "
                       "and mmn report use it when --model is left out)")
    fp = run_fingerprint(res)
    mine = engine.fingerprint
    if fp and fp != mine and fp not in engine.fingerprints_of_this_model():  # older runs: the old hash
        msg = (f"the loaded model '{model_name(engine)}' (weights {mine}) is not the one the run in '{res.path}' "
               f"recorded ('{run_model}', weights {fp}): another or edited checkpoint, a patch applied, another "
               f"dtype; {what} may not match the run's neurons")
        warnings.warn(msg, RunModelWarning, stacklevel=3)
        return msg
    return None


def ids_digest(ids) -> str:
    """Short sha1 of a list of record ids, in order: ties metrics.json to the records it was computed on."""
    h = hashlib.sha1()
    for i in ids:
        h.update(json.dumps(str(i)).encode() + b"\n")
    return h.hexdigest()[:16]
