"""Peak memory of writing a large table with `mmn_fast.io.save_safetensors` (what a dense
aggregates checkpoint does): run it in a fresh process, it reads its own peak RSS.

    python bench/run_save_peak.py [--mib 1000]
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile

import torch

from mmn_fast.io import save_safetensors

ap = argparse.ArgumentParser()
ap.add_argument("--mib", type=int, default=1000)
args = ap.parse_args()
tensors = {f"t{i}": torch.randn(25 * 2**20 // 4) for i in range(args.mib // 25)}  # 25 MiB each
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
with tempfile.TemporaryDirectory() as tmp:
    save_safetensors(os.path.join(tmp, "table.safetensors"), tensors, {"format_version": "2"})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import safetensors  # noqa: E402

print(f"safetensors {safetensors.__version__}: saving a {args.mib} MiB table raised peak RSS by "
      f"{(peak - base) / 1024:.0f} MiB")
