#!/usr/bin/env bash
# Every GPU check of the project in one go, for a lent device machine with torch, triton, transformers,
# numpy, safetensors, pillow and tqdm but no package index (nothing is installed: it runs from the tree).
# At most 7.5 minutes (timed steps), so it fits one device command with time to spare:
#   bash bench/gpu_check.sh            # writes its logs under $OUT (or ./gpu_out)
# 1. the GPU tests at realistic widths, 2. the kernel table at LLaMA-7B/13B sizes with the copy
# bandwidth of the same run (act_score's share of it; vocab_topk against the bf16 matmul), 3. images/s
# of generate, caption, find (both backends) and two-phase on the whole 32-layer 7B shape at batch
# 8/32/64, 4. with the time left, the small-shape kernel tests compiled for real.
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
stamp() { echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }
stamp start
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the tree: the device machines have no package index
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
stamp "GPU tests"
timeout 90 python3 -m pytest -q tests/test_kernels_cuda.py 2>&1 | tail -25 | tee "$out/gpu_tests.log"
stamp "kernel table"
timeout 90 python3 bench/run_kernels.py --device cuda --repeats 20 2>&1 | tee "$out/kernels.md"
stamp "end to end"
timeout 240 python3 bench/run_bench.py --gpu --layers 32 --batches 8 32 64 --repeats 3 2>&1 | tee "$out/e2e.md"
stamp "small-shape kernel tests, compiled"
timeout 30 python3 -m pytest -q -x tests/test_vocab_topk_triton.py tests/test_act_score.py 2>&1 | tail -15 | tee "$out/small_tests.log"
stamp done
