"""The Triton kernels compiled for an H100 (sm_90) on this CPU, with triton's bundled ptxas, and
read back from the SASS: no GPU needed. Guards what timings on a GPU would show much later: the
vocab_topk filter GEMM's main loop must not spill and must load both operand tiles with 128-bit
cp.async; act_score must not spill and must load 128 bits at a time (bench/sass_report.py).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(),
                    reason="this triton build has no bundled CUDA toolchain")
def test_default_kernel_configurations_compile_without_loop_spills_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")  # compile for real, in its own process
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "sass_report.py"), "--check"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok: no main-loop spills" in res.stdout
