#!/usr/bin/env bash
# Every GPU check of the project in one go (about 4-6 minutes on an H100; the kernel tests compile ~100 variants), for a lent device machine:
#   bash bench/gpu_check.sh            # writes its logs under $OUT (or ./gpu_out)
# 1. the GPU tests (compiled Triton kernels, interpreter off), 2. the kernel table at LLaMA-7B/13B
# sizes with the copy bandwidth of the same run, 3. find vs plain generate on LLaMA-7B-shaped layers.
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || echo "editable install failed (see install.log)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
timeout 240 python3 -m pytest -q -x tests/test_kernels_cuda.py tests/test_act_score.py tests/test_vocab_topk_triton.py 2>&1 | tail -20 | tee "$out/gpu_tests.log"
timeout 120 python3 bench/run_kernels.py --device cuda --repeats 20 2>&1 | tee "$out/kernels.md"
timeout 120 python3 bench/run_bench.py --gpu --repeats 5 2>&1 | tee "$out/e2e.md"
