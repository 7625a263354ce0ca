#!/usr/bin/env bash
# Short GPU check after a structural change (about 5 minutes on an H200), run from the tree on an
# offline device machine:  bash bench/gpu_reshape_check.sh   (logs under $OUT, or ./gpu_out)
# 1. the CUDA tests (compiled kernels vs torch, fused find vs hooks), 2. find vs plain generate.
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
stamp() { echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
stamp "CUDA tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py 2>&1 | tail -25 | tee "$out/gpu_tests.log"
stamp "end to end"
timeout 200 python3 bench/run_bench.py --gpu --repeats 3 2>&1 | tee "$out/e2e.md"
stamp done
