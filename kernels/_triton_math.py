"""Triton device functions shared by the kernel modules (imported only by them, so triton stays optional)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 -> dtype. RNE_BF16: round to nearest even by hand first (triton's interpreter truncates
    fp32 -> bf16; on a GPU the plain cast already rounds to nearest even)."""
    if RNE_BF16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # keep the top 16 bits, rounded
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN kept as is
    return x.to(dtype)
