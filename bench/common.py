"""Benchmark setups shared by the pytest-benchmark file and the ratio-table script."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import mmn_fast
from mmn_fast import DEFAULT_PROMPT
from mmn_fast.kernels.timing import wall_times
from mmn_fast.testing import llava_model, random_images, tiny_llava

# The random LLaVA-architecture model: 8 layers, hidden 512, 256 image tokens, 32 new tokens.
LARGE = dict(num_layers=8, hidden_size=512, intermediate_size=1408, image_size=128, patch_size=8)
# GPU: LLaMA-7B-shaped decoder layers (hidden 4096, MLP 11008), 8 of them, llava-1.5's 576 image tokens.
GPU_7B_LAYERS = dict(num_layers=8, hidden_size=4096, intermediate_size=11008, image_size=336, patch_size=14,
                     vision_hidden=256)
NEW_TOKENS = 32


# Host-bound: 32 thin layers, so per-layer Python (HF's and ours) sets the time, as in eager decode
# steps of a 7B model on a GPU, where the kernels take less time than launching them.
HOST_BOUND = dict(num_layers=32, hidden_size=64, intermediate_size=172, image_size=32, patch_size=8)


def random_llava_engine(workdir: str | None = None, shape: dict | None = None, device: str = "cpu"):
    """(engine, images) for the random model (`LARGE` unless `shape`) on `device` (backend auto); EOS
    disabled so every run makes NEW_TOKENS tokens."""
    shape = shape or LARGE
    workdir = workdir or tempfile.mkdtemp(prefix="mmn_bench_")
    path = tiny_llava(Path(workdir) / "llava_random", seed=0, **shape)
    eng = mmn_fast.load(path, device=device)
    eng.model.generation_config.eos_token_id = None
    eng.eos_ids = set()
    return eng, random_images(8, size=shape["image_size"], seed=1)


def gpu_llava_engines(device: str = "cuda", dtype=torch.bfloat16, backends=("triton", "torch"), num_layers: int = 8,
                      n_images: int = 8):
    """({backend: engine}, images): one random LLaMA-7B-layer LLaVA (`num_layers` of them; 32 is the whole
    7B shape) built on `device`, one engine per backend over the same weights; EOS disabled so every run
    makes NEW_TOKENS tokens."""
    model, processor = llava_model(seed=0, torch_dtype=dtype, device=device, **{**GPU_7B_LAYERS, "num_layers": num_layers})
    model.generation_config.eos_token_id = None
    engines = {}
    for backend in backends:
        eng = mmn_fast.load(model, processor=processor, device=device, backend=backend)
        eng.eos_ids = set()
        engines[backend] = eng
    return engines, random_images(n_images, size=GPU_7B_LAYERS["image_size"], seed=1)


def demo_engine(cache_dir=None):
    from mmn_fast.demo import build_demo_model, make_examples

    eng = mmn_fast.load(build_demo_model(cache_dir, progress=False), device="cpu")
    return eng, [img for img, _ in make_examples(8, seed=99)]


def plain_generate(eng, images, max_new_tokens, batch_size=8):
    """What captioning alone costs: the same preprocessing and greedy generate, no capture."""
    out = []
    for s in range(0, len(images), batch_size):
        inputs = eng.encode(images[s : s + batch_size], DEFAULT_PROMPT, None)
        with torch.no_grad():
            out.append(eng.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1))
    return out


def hooks_peer(eng, images, max_new_tokens, batch_size=8, top_k=50):
    """The peer a careful user writes without mmn_fast: Hugging Face generate (its default cache) with a
    forward pre-hook on every layer's down_proj keeping h at the last position of each step, then
    a * <W_out[:, i], W_U[t]> for every generated token t, top-k over all neurons. Returns per image
    the [S, k] top neuron indices (flat layer * F + i)."""
    ad = eng.adapter
    w_u = ad.unembed_weight().detach()
    w_out = torch.stack([ad.out_weight(l).detach() for l in range(ad.n_layers)])  # [L, d, F]
    out = []
    for s in range(0, len(images), batch_size):
        inputs = eng.encode(images[s : s + batch_size], DEFAULT_PROMPT, None)
        seen = [[] for _ in range(ad.n_layers)]
        hooks = [ad.out_projs[l].register_forward_pre_hook(lambda _m, a, l=l: seen[l].append(a[0][:, -1].detach()))
                 for l in range(ad.n_layers)]
        try:
            with torch.no_grad():
                seq = eng.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        finally:
            for h in hooks:
                h.remove()
        new = seq[:, inputs["input_ids"].shape[1]:]  # [B, S]
        with torch.no_grad():
            acts = torch.stack([torch.stack(steps[: new.shape[1]], 1) for steps in seen], 2)  # [B, S, L, F]
            u = w_u[new]  # [B, S, d]
            proj = torch.einsum("bsd,ldf->bslf", u, w_out)  # [B, S, L, F]
            scores = (acts * proj).flatten(2)  # [B, S, L*F]
            out += list(scores.topk(top_k, dim=-1).indices)
    return out


def find(eng, images, max_new_tokens, batch_size=8, **kw):
    return eng.find(images, concepts="all", top_k=50, max_new_tokens=max_new_tokens, batch_size=batch_size, **kw)


def reference(eng, images, max_new_tokens):
    from mmn_fast.find.reference import reference_find

    return [reference_find(eng, img, DEFAULT_PROMPT, concepts="all", activation="down_proj_input", top_k=50,
                           max_new_tokens=max_new_tokens) for img in images]


def median_time(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls (CUDA work is synchronised around each; the upper middle of an
    even count, as these tables have always taken it)."""
    times, _ = wall_times(fn, repeats, "cuda" if torch.cuda.is_available() else "cpu")
    return sorted(times)[len(times) // 2]
