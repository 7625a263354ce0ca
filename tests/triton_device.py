"""Where the Triton kernel tests run: `kernel_device()` is "cpu" under triton's interpreter (set by
conftest.py before triton loads), "cuda" with the interpreter off on a GPU; otherwise the calling
test module is skipped. `refuse_fallback` is shared by the CPU and GPU vocab_topk tests."""
import importlib

import pytest
import torch

from mmn_fast.kernels import interpreter_on


def kernel_device() -> str:
    triton = pytest.importorskip("triton")
    if interpreter_on():
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(triton.language.standard.sigmoid, InterpretedFunction):
            pytest.fail("TRITON_INTERPRET=1 was set after triton was imported; set it before (see conftest.py)")
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device", allow_module_level=True)


def refuse_fallback(monkeypatch) -> None:
    """Make the vocab_topk filter method's exact per-row recomputation an error: the kernel itself
    must answer."""
    mod = importlib.import_module("mmn_fast.kernels._vocab_filter_triton")

    def refuse(*a, **kw):
        raise AssertionError("a row fell back to the exact recomputation")

    monkeypatch.setattr(mod, "exact_rows", refuse)
