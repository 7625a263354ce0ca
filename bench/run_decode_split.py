"""Where one batch's captioning time goes on the benchmark model (docs/benchmarks.md, "End to end, 2026-12-05"):

    python bench/run_decode_split.py [--repeats 3] [--compile]

the prefill alone, generate with 1 and with 32 new tokens (transformers' dynamic cache, and the static one
`kv_cache="auto"` takes on CPU), one decode step called directly on a static cache against a step inside
generate, and with --compile the static-cache generate with transformers' CompileConfig (inductor; its
first call, the compilation, timed apart). Batch of 8 images of the random LLaVA (8 layers, hidden 512).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import CompileConfig, StaticCache

sys.path.insert(0, os.path.dirname(__file__))
from common import NEW_TOKENS, median_time, random_llava_engine  # noqa: E402

from mmn_fast import DEFAULT_PROMPT  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time a compiled decode step (about 30 s to compile)")
    args = ap.parse_args()
    eng, images = random_llava_engine()
    model = eng.model
    inputs = eng.encode(images, DEFAULT_PROMPT, None)
    b, t = inputs["input_ids"].shape

    def generate(n, **kw):
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=n, do_sample=False, num_beams=1, **kw)

    def prefill():
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)

    static = dict(cache_implementation="static", disable_compile=True)
    generate(2), generate(2, **static)  # warm-up
    rows = [("prefill (one forward, no new token)", median_time(prefill, args.repeats))]
    for name, kw in (("dynamic", {}), ("static", static)):
        one = median_time(lambda: generate(1, **kw), args.repeats)
        full = median_time(lambda: generate(NEW_TOKENS, **kw), args.repeats)
        rows += [(f"generate 1 token, {name} cache", one), (f"generate {NEW_TOKENS} tokens, {name} cache", full),
                 (f"  a decode step inside generate, {name} cache (ms)", 1e3 * (full - one) / (NEW_TOKENS - 1))]

    cache = StaticCache(config=model.config, max_cache_len=t + NEW_TOKENS)  # one step called directly
    mask = torch.cat([inputs["attention_mask"], torch.ones(b, NEW_TOKENS, dtype=torch.long)], 1)
    steps = []
    with torch.no_grad():
        out = model(**inputs, past_key_values=cache, use_cache=True, cache_position=torch.arange(t), logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for s in range(NEW_TOKENS - 1):
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=torch.tensor([t + s]),
                        attention_mask=mask[:, : t + s + 1], logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t0)
    rows.append(("  a decode step called directly, static cache (ms)", 1e3 * sorted(steps)[len(steps) // 2]))

    if args.compile:
        cc = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        cc._compile_all_devices = True  # transformers compiles on GPUs only unless told
        compiled = dict(cache_implementation="static", compile_config=cc)
        t0 = time.perf_counter()
        first = generate(NEW_TOKENS, **compiled)
        rows.append(("compiled: first call, compilation included", time.perf_counter() - t0))
        assert torch.equal(first, generate(NEW_TOKENS, **static)), "the compiled decode changed the tokens"
        rows.append((f"compiled: generate {NEW_TOKENS} tokens, static cache",
                     median_time(lambda: generate(NEW_TOKENS, **compiled), args.repeats)))

    print(f"# CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; batch {b}, prompt {t} tokens; "
          f"seconds (medians of {args.repeats}) unless marked ms")
    print("| what | time |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
