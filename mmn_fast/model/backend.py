"""Kernel backend selection: `"auto" | "triton" | "torch"`, chosen once per engine.

`$MMN_BACKEND` overrides the default ("auto"). Auto picks Triton when the model is on CUDA, triton
imports and the model's MLPs can be fused, torch otherwise; an explicit "triton" on CPU tensors
needs the Triton interpreter (`TRITON_INTERPRET=1`, for tests); an auto choice that cannot run
falls back to torch with a one-line notice (a UserWarning), an explicit request that cannot run is
an error. Nothing here imports triton or touches CUDA at import time.
"""
from __future__ import annotations

import os
import warnings

import torch

from ..errors import MMNError
from ..kernels import interpreter_on, triton_available

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "MMN_BACKEND"


def _triton_problem(device: torch.device) -> str | None:
    """Why Triton kernels cannot run for tensors on `device`, or None when they can."""
    if not triton_available():
        return "triton is not installed (pip install 'mmn_fast[triton]')"
    if device.type != "cuda" and not interpreter_on():
        return f"the model is on {device.type}, not CUDA (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return None


def resolve_backend(requested: str | None, device: torch.device | str, unsupported: str | None = None) -> str:
    """'triton' or 'torch' for a model on `device`.

    requested: "auto" | "triton" | "torch", or None for $MMN_BACKEND (default "auto").
    unsupported: why the model itself cannot use the fused path (e.g. an unrecognised MLP), if so.
    """
    source = "backend"
    if requested is None:
        requested, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR
    requested = requested.lower()
    if requested not in BACKENDS:
        raise MMNError(f"{source}={requested!r} is not a backend: use one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch"
    device = torch.device(device)
    problem = _triton_problem(device) or unsupported
    if requested == "triton":
        if problem:
            raise MMNError(f"backend 'triton' cannot run: {problem}; use backend='torch'")
        return "triton"
    if device.type != "cuda":  # auto: the kernels only pay on a GPU
        return "torch"
    if problem is None:
        return "triton"
    warnings.warn(f"mmn: notice: using the torch backend ({problem})", stacklevel=2)
    return "torch"
