"""Static resource report of the Triton kernels for an H100 (sm_90), without a GPU.

Compiles each kernel ahead of time with triton's bundled ptxas and reads the SASS with its
cuobjdump: registers per thread, stack bytes (register spills), shared memory, and how many
local-memory (spill) instructions sit inside loops, and the widths of the global loads. A spill inside a GEMM's main loop costs on
every K step; one in the epilogue costs once per tile. This is how the `vocab_topk` filter kernel's
epilogue was chosen in a session with no GPU (see docs/benchmarks.md); timings still need one.

    python bench/sass_report.py            # the table, about 20 s on 2 CPU cores
    python bench/sass_report.py --check    # exit 1 if a default configuration spills in a loop
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for real, even where conftest-like code set it
warnings.filterwarnings("ignore")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmn_fast.kernels._act_score_triton import act_score_kernel  # noqa: E402
from mmn_fast.kernels._vocab_filter_triton import vocab_filter_kernel  # noqa: E402
from mmn_fast.kernels._vocab_topk_triton import vocab_topk_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _compile(fn, types: dict, consts: dict, num_warps: int, num_stages: int = 3, unaligned: tuple = ()):
    """Compile as triton's JIT would for contiguous, 16-byte aligned tensors whose sizes are
    multiples of 16 (LLaMA widths): pointers and the remaining integer arguments get
    `tt.divisibility=16`, as the JIT gives them at launch; strides of 1 come in `consts`, as the
    JIT makes them constants. Without these hints loads would not vectorize. `unaligned` names the
    integer arguments that are not multiples of 16 in the case modelled."""
    sig = {**types, **{c: "constexpr" for c in consts}}
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in types.items()
             if t.startswith("*") or (t == "i32" and a not in unaligned)}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _sass(kernel) -> tuple[list[str], list[str]]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    usage = next(line for line in res.splitlines() if "REG:" in line).split()
    lines = [line for line in sass.splitlines() if "/*" in line and ";" in line]
    return usage, lines


def stats(kernel) -> dict:
    """Registers, stack bytes, shared memory, instruction count, local (spill) instructions in all
    and inside loops, whether wgmma is used, and the global loads counted by opcode."""
    usage, lines = _sass(kernel)
    fields = dict(u.split(":", 1) for u in usage if ":" in u)
    addr = {}
    for i, line in enumerate(lines):
        head = line.strip().split("*/")[0].lstrip("/*")
        addr[int(head, 16)] = i
    in_loop = set()
    for i, line in enumerate(lines):  # a backward branch closes a loop
        if " BRA " in line:
            target = int(line.split("BRA")[1].split(";")[0].strip(), 16)
            if target in addr and addr[target] < i:
                in_loop.update(range(addr[target], i + 1))
    local = [i for i, line in enumerate(lines) if "LDL" in line or "STL" in line]
    loads = Counter()
    for line in lines:  # global loads by width: a 16-bit LDG where a 128-bit one fits is lost bandwidth
        ops = line.split("*/")[1].split()
        op = ops[1] if ops[0].startswith("@") else ops[0]
        if op.startswith(("LDG.", "LDGSTS.")) and op != "LDGDEPBAR":
            loads[op.replace(".E", "").replace(".BYPASS", "")] += 1
    return dict(regs=int(fields["REG"]), stack=int(fields["STACK"]), shared=kernel.metadata.shared,
                instructions=len(lines), local=len(local), loop_local=sum(1 for i in local if i in in_loop),
                wgmma=any("HGMMA" in line for line in lines), loads=dict(loads))


def report(name: str, kernel) -> str:
    st = stats(kernel)
    load_s = ", ".join(f"{op} x{n}" for op, n in sorted(st["loads"].items()))
    return (f"| {name} | {st['regs']} | {st['stack']} | {st['shared'] // 1024} KiB | {st['instructions']} | "
            f"{st['local']} | {st['loop_local']} | {'yes' if st['wgmma'] else 'no'} | {load_s} |")


def check() -> list[str]:
    """What must hold of the default configurations; [] when it all does (`--check`, run by
    tests/test_kernels_sass.py in CI): a filter GEMM main loop with no spills and both operand
    tiles on 128-bit cp.async, and an act_score that never spills and loads 128 bits at a time."""
    problems = []
    f = stats(compiled_filter(True, True))
    if f["loop_local"]:
        problems.append(f"vocab_topk filter: {f['loop_local']} spill instructions inside its main loop")
    if not f["wgmma"] or f["loads"].get("LDGSTS.128", 0) < 24 or any(op.startswith("LDG.U") for op in f["loads"]):
        problems.append(f"vocab_topk filter: operand tiles not all on 128-bit cp.async with wgmma: {f}")
    for reduce_max in (False, True):
        a = stats(compiled_act_score(reduce_max))
        if a["stack"] or a["local"] or not a["loads"].get("LDG.128"):
            problems.append(f"act_score (max={reduce_max}): spills or narrow loads: {a}")
    return problems


def compiled_filter(top, bottom, bf=128, bv=128, bd=64, warps=8, from_logits=False, hints=True):
    types = {"wo_ptr": "*bf16", "wu_ptr": "*bf16", "top_thr_ptr": "*fp32", "bot_thr_ptr": "*fp32",
             "top_cnt_ptr": "*i32", "bot_cnt_ptr": "*i32", "top_val_ptr": "*fp32", "top_id_ptr": "*i32",
             "bot_val_ptr": "*fp32", "bot_id_ptr": "*i32", **{a: "i32" for a in
             ("D", "F", "V0", "V", "C", "s_wo_d", "s_wu_v")}}
    if from_logits:  # logits [F, chunk]: the row stride is the chunk, the column stride 1
        types["wo_ptr"] = "*fp32"
    consts = dict(s_wo_f=1, s_wu_d=1, TOP=top, BOTTOM=bottom, BLOCK_F=bf, BLOCK_V=bv, BLOCK_D=bd, GROUP_F=8, EVEN_D=True,
                  UPCAST=False, PRECISION="tf32", FROM_LOGITS=from_logits, HINT_F=hints, HINT_V=hints)
    unaligned = () if hints else ("F",)  # a column slice W_out[:, :100] of a 1024-wide matrix
    return _compile(vocab_filter_kernel, types, consts, warps, unaligned=unaligned)


def compiled_bitonic(bf=64, bv=128, bd=64, kp=64):
    types = {"wo_ptr": "*bf16", "wu_ptr": "*bf16", "top_v_ptr": "*fp32", "top_i_ptr": "*i64",
             "bot_v_ptr": "*fp32", "bot_i_ptr": "*i64",
             **{a: "i32" for a in ("D", "F", "V", "K", "s_wo_d", "s_wu_v")}}
    consts = dict(s_wo_f=1, s_wu_d=1, TOP=True, BOTTOM=True, KP=kp, BLOCK_F=bf, BLOCK_V=bv, BLOCK_D=bd, UPCAST=False, PRECISION="tf32")
    return _compile(vocab_topk_kernel, types, consts, 4)


def compiled_act_score(reduce_max, block_f=1024):
    types = {"gate_ptr": "*bf16", "up_ptr": "*bf16", "h_ptr": "*bf16", "red_ptr": "*fp32", "cap_dst_ptr": "*i64",
             "cap_ptr": "*bf16", "cap_act_ptr": "*bf16", "chunk_start_ptr": "*i64", "chunk_end_ptr": "*i64",
             "chunk_group_ptr": "*i64", "F": "i32"}
    consts = dict(G=1, ACT="silu", HAS_UP=True, HAS_PROJ=True, REDUCE_MAX=reduce_max, HAS_CAPTURE=True,
                  CAPTURE_ACT=False, BLOCK_N=1, BLOCK_F=block_f, RNE_BF16=False)
    return _compile(act_score_kernel, types, consts, 4)


def main():
    if "--check" in sys.argv:
        problems = check()
        print("\n".join(problems) or "ok: no main-loop spills, 128-bit loads")
        sys.exit(1 if problems else 0)
    print(f"# sm_90 (H100) SASS, bf16 inputs, triton {triton.__version__}, compiled on CPU\n")
    print("| kernel | registers | stack bytes | shared | SASS instructions | local (spill) ops | in loops | wgmma "
          "| global loads |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [
        ("vocab_topk filter, top-k, 128x128x64, 8 warps", lambda: compiled_filter(True, False)),
        ("vocab_topk filter, top + bottom, 128x128x64, 8 warps", lambda: compiled_filter(True, True)),
        ("vocab_topk filter, top + bottom, 128x128x64, 4 warps", lambda: compiled_filter(True, True, warps=4)),
        ("vocab_topk filter, top + bottom, 128x256x64, 8 warps", lambda: compiled_filter(True, True, bv=256)),
        ("vocab_topk filter, top + bottom, W_out[:, :100] of a wider matrix (no hints)",
         lambda: compiled_filter(True, True, hints=False)),
        ("vocab_topk filter on cuBLAS logits, top + bottom", lambda: compiled_filter(True, True, from_logits=True)),
        ("vocab_topk bitonic, top + bottom, 64x128x64, k=64", compiled_bitonic),
        ("act_score, SiLU, sums, capture", lambda: compiled_act_score(False)),
        ("act_score, SiLU, max/min, capture", lambda: compiled_act_score(True)),
    ]
    for name, make in rows:
        try:
            print(report(name, make()), flush=True)
        except Exception as e:  # a compiler failure is a finding, not a crash of the report
            print(f"| {name} | compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |||||||")


if __name__ == "__main__":
    main()
