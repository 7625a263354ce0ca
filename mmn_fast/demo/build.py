"""Build (once) the demo model: a tiny LLaVA (CLIP vision + LLaMA text) that captions shapes.

Everything is made from code, offline: a word-level tokenizer over the closed vocabulary, a CLIP
image processor, a LlavaProcessor with a llava-1.5 chat template, and a model trained for about
60 s on one CPU core. Two choices make it show what the paper finds in large VLMs: the
residual stream is split so that only MLP neurons bridge the image to the words
(`_route_through_mlps`: hence zeroing a colour's top neurons changes the colour), and each image
token is also trained to name the colour under its patch (`_patch_colours`: hence a colour
neuron's activations over the image tokens light up the object). The checkpoint is a plain Hugging Face directory (safetensors + JSON); it is built
in a temporary directory and renamed into place only once complete and verified, the marker file
`demo_info.json` being written last.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import (AutoProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging

from ..io import umask, user_cache_dir
from ..model.templates import LLAVA_CHAT_TEMPLATE
from .data import COLOURS, IMAGE_SIZE, SHAPES, make_examples, make_examples_with_masks

try:  # transformers 5: the default CLIPImageProcessor needs torchvision; the PIL one does not
    from transformers import CLIPImageProcessorPil as ImageProcessor
except ImportError:  # pragma: no cover
    from transformers import CLIPImageProcessor as ImageProcessor

log = logging.getLogger(__name__)

RECIPE_VERSION = 3
CACHE_SUBDIR = f"demo-v{RECIPE_VERSION}"
INFO_FILE = "demo_info.json"
DEMO_PROMPT = "Describe the image."
MIN_ACCURACY = 0.95

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD, UNK, BOS, EOS, IMAGE = SPECIAL_TOKENS
PUNCTUATION = (".", ",", ":", ";", "?", "!", "'", '"', "(", ")", "-")
# Prompt/caption words (lowercased). A few extra prompt words keep other short prompts in-vocabulary.
WORDS = ("user", "assistant", "system", "describe", "the", "image", "a", "an", "and", "what", "is", "in",
         "this", "of", "picture", "photo", "shape", "shapes", "colour", "color", "object", "objects",
         "left", "right", "there", "are", "which", "it")

CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE  # llava-1.5 style: "USER: <image>\n{prompt} ASSISTANT:"

# Model sizes (see _build_model) and training recipe.
PATCH_SIZE = 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS dropped by the "default" feature strategy
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
TRAIN = dict(n_train=12000, vision_steps=1500, vision_lr=3e-3, steps=350, lr=3e-3, tower_lr=1e-3, batch_size=64,
             warmup=20, weight_decay=0.01, act_l1=3.0, patch_loss=True, seed=0, eval_seed=1_000_003, n_eval=256)
MAX_NEW_TOKENS = 12
# Residual-stream split that routes what is seen through the MLP neurons (see _route_through_mlps):
# attention writes only dims [0, ROUTE_DIMS), the unembedding reads only dims [ROUTE_DIMS, d).
ROUTE_DIMS = TEXT["hidden_size"] // 2
# One intra-op thread: the weights are then bit-identical whatever the machine's core count, and a
# build sharing the CPU with another busy torch process slows down ~2x instead of ~100x (two
# spinning OpenMP pools on 2 cores). Costs ~30% against 2 threads on an idle 2-core machine.
BUILD_THREADS = 1


def default_cache_dir() -> Path:
    """Root of the mmn_fast cache (`mmn_fast.io.user_cache_dir`); the demo lives in `demo-v{RECIPE_VERSION}/`."""
    return user_cache_dir()


def _vocab_list() -> list[str]:
    words = list(WORDS) + list(COLOURS) + list(SHAPES)
    return list(SPECIAL_TOKENS) + list(PUNCTUATION) + list(dict.fromkeys(words))


def build_tokenizer():
    """Word-level PreTrainedTokenizerFast over the closed demo vocabulary (adds <s> in front)."""

    vocab = {tok: i for i, tok in enumerate(_vocab_list())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        image_token=IMAGE, padding_side="left", model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False, model_max_length=256)


def build_processor():
    """LlavaProcessor: CLIP image processor at IMAGE_SIZE px + tokenizer + chat template."""
    image_processor = ImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                     crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                     do_resize=True, do_center_crop=True)
    # num_additional_image_tokens=1: CLIP's CLS token, which the "default" strategy drops again.
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", image_token=IMAGE,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def prompt_text(processor, prompt: str = DEMO_PROMPT) -> str:
    """The chat-templated generation prompt: 'USER: <image>\\n{prompt} ASSISTANT:'."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _build_model(tokenizer):

    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in
           (("pad", PAD), ("bos", BOS), ("eos", EOS), ("image", IMAGE))}
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=VISION["hidden_size"],
                              hidden_act="quick_gelu", **VISION)
    text = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256,
                       num_key_value_heads=TEXT["num_attention_heads"], pad_token_id=ids["pad"],
                       bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                       tie_word_embeddings=False, **TEXT)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["image"],
                         image_seq_length=N_IMAGE_TOKENS, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=False)
    for name in ("pad", "bos", "eos"):
        setattr(config, f"{name}_token_id", ids[name])
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                                               bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                               pad_token_id=ids["pad"])
    return model


def _patch_colours(examples_with_masks, tokenizer) -> torch.Tensor:
    """[N, n_img] token id of the colour covering most of each image patch (at least half of it),
    -100 where no object does: the targets of the patch loss (see _training_tensors)."""

    side = IMAGE_SIZE // PATCH_SIZE
    out = torch.full((len(examples_with_masks), side * side), -100, dtype=torch.long)
    for i, (_, caption, masks) in enumerate(examples_with_masks):
        colours = [obj.split()[1] for obj in caption.split(" and ")]
        for mask, colour in zip(masks, colours):
            cover = np.asarray(mask, dtype=np.float32).reshape(side, PATCH_SIZE, side, PATCH_SIZE).mean((1, 3))
            hit = torch.from_numpy(cover.reshape(-1) >= 0.5)
            out[i][hit] = tokenizer.convert_tokens_to_ids(colour)
    return out


def _training_tensors(processor, examples, patch_colours: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Prompt + caption + </s>, right-padded; labels are -100 except on caption tokens and </s>.

    patch_colours [N, n_img]: also ask the position of each image token to name the colour of the
    object under its patch (labels are shifted by one inside the model: the label at p + 1 is what
    position p predicts). It makes the image tokens' MLP activations follow the objects, as the
    paper's heatmaps show in large VLMs."""
    tok = processor.tokenizer
    text = prompt_text(processor)
    images = [im for im, _ in examples]
    enc = processor(images=images[:1], text=[text], return_tensors="pt")
    prompt_ids = enc["input_ids"][0].tolist()  # [P] includes <s> and the expanded image tokens
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]  # [N, 3, H, W]
    targets = [tok(" " + cap, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, cap in examples]
    length = len(prompt_ids) + max(map(len, targets))
    input_ids = torch.full((len(examples), length), tok.pad_token_id, dtype=torch.long)  # [N, T]
    labels = torch.full_like(input_ids, -100)                                           # [N, T]
    attention_mask = torch.zeros_like(input_ids)                                        # [N, T]
    p = len(prompt_ids)
    for i, tgt in enumerate(targets):
        input_ids[i, :p + len(tgt)] = torch.tensor(prompt_ids + tgt)
        labels[i, p:p + len(tgt)] = torch.tensor(tgt)
        attention_mask[i, :p + len(tgt)] = 1
    if patch_colours is not None:
        image_pos = torch.tensor([j for j, t in enumerate(prompt_ids) if t == tok.convert_tokens_to_ids(IMAGE)])
        labels[:, image_pos + 1] = patch_colours  # position of image token j predicts its patch's colour
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": pixel_values}


@torch.no_grad()
def caption(model, processor, images, prompt: str = DEMO_PROMPT, batch_size: int = 64) -> list[str]:
    """Greedy captions through the processor and chat template."""
    text = prompt_text(processor, prompt)
    out = []
    model.eval()
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        enc = processor(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)  # [B, P + new]
        new = gen[:, enc["input_ids"].shape[1]:]
        out += [s.strip() for s in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def _aux_targets(captions: list[str]) -> torch.Tensor:
    """[N, 5] long: (two objects?, colour 1, shape 1, colour 2, shape 2); -100 where there is no object 2."""
    colours, rows = list(COLOURS), []
    for cap in captions:
        objs = [o.split() for o in cap.split(" and ")]  # [["a", colour, shape], ...]
        row = [len(objs) - 1, colours.index(objs[0][1]), SHAPES.index(objs[0][2])]
        row += [colours.index(objs[1][1]), SHAPES.index(objs[1][2])] if len(objs) > 1 else [-100, -100]
        rows.append(row)
    return torch.tensor(rows)


def _schedule(warmup: int, steps: int):
    """LR multiplier: linear warmup, then cosine decay to 0."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return f


def _adamw(named_params, lr: float, weight_decay: float):
    named = [(n, p) for n, p in named_params if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def _bar(n: int, desc: str, progress: bool):
    return tqdm(range(n), desc=desc, disable=not progress, file=sys.stderr, leave=False, dynamic_ncols=True,
                mininterval=0.5)


def pretrain_vision(model, pixel_values: torch.Tensor, targets: torch.Tensor, progress: bool = True) -> float:
    """Stage 1: warm up the CLIP tower alone, with a throw-away linear probe on its patch features
    (the features LLaVA feeds the projector) predicting the objects' colours and shapes. This stands
    in for the pretrained CLIP a real LLaVA starts from; it is ~10x cheaper per step than stage 2.

    pixel_values: [N, 3, H, W]; targets: [N, 5] from `_aux_targets`. Returns the final loss.
    """
    cfg = TRAIN
    tower = model.model.vision_tower
    sizes = [2, len(COLOURS), len(SHAPES), len(COLOURS), len(SHAPES)]
    head = torch.nn.Linear(N_IMAGE_TOKENS * VISION["hidden_size"], sum(sizes))
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    params = list(tower.named_parameters()) + [("head." + n, p) for n, p in head.named_parameters()]
    opt = _adamw(params, cfg["vision_lr"], cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg["warmup"], cfg["vision_steps"]))
    tower.train()
    bar = _bar(cfg["vision_steps"], "demo model 1/2: vision warm-up", progress)
    for step in bar:
        idx = torch.randint(0, pixel_values.shape[0], (cfg["batch_size"],), generator=gen)  # [B]
        feats = tower(pixel_values=pixel_values[idx]).last_hidden_state[:, 1:]  # [B, n_img, Dv], CLS dropped
        logits = head(feats.flatten(1)).split(sizes, dim=-1)                     # 5 x [B, classes]
        y = targets[idx]                                                         # [B, 5]
        loss = sum(torch.nn.functional.cross_entropy(lg, y[:, i], ignore_index=-100)
                   for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    return float(loss.item())


def _route_through_mlps(model) -> list:
    """Make the MLP neurons the only bridge from the image to the words, as the paper finds them
    to be in large VLMs: every attention output projection writes only the residual dims
    [0, ROUTE_DIMS) and the unembedding reads only [ROUTE_DIMS, d). Image information reaches a
    text position only through attention, so it can reach the logits only through an MLP. Without
    this a model this small writes colours straight from attention into the logits, and zeroing
    its top neurons changes nothing. The constraint is a zero block in ordinary LLaVA weights
    (kept zero by masking gradients; decoupled weight decay keeps zeros zero), so the checkpoint is
    a plain LLaVA. Returns the gradient-hook handles, to remove after training.
    """
    lm = model.model.language_model
    blocks = [(layer.self_attn.o_proj.weight, (slice(ROUTE_DIMS, None), slice(None))) for layer in lm.layers]
    blocks.append((model.lm_head.weight, (slice(None), slice(0, ROUTE_DIMS))))  # [V, d]
    if TRAIN["patch_loss"]:  # image embeddings in the attention half only: patches name colours via MLPs
        proj = model.model.multi_modal_projector.linear_2
        blocks += [(proj.weight, (slice(ROUTE_DIMS, None), slice(None))), (proj.bias, (slice(ROUTE_DIMS, None),))]
    handles = []
    for weight, block in blocks:
        mask = torch.ones_like(weight)
        mask[block] = 0
        with torch.no_grad():
            weight.mul_(mask)
        handles.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
    return handles


def train(model, batch: dict[str, torch.Tensor], progress: bool = True) -> float:
    """Stage 2: captioning loss (caption tokens and </s> only) on random minibatches of `batch`;
    projector and language model at `lr`, the warmed-up vision tower at the lower `tower_lr`.
    Returns an EMA of the loss."""
    cfg = TRAIN
    gen = torch.Generator().manual_seed(cfg["seed"])
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    opt = _adamw(model.named_parameters(), cfg["lr"], cfg["weight_decay"])  # all but the tower
    tower.requires_grad_(True)
    for group in _adamw(tower.named_parameters(), cfg["tower_lr"], cfg["weight_decay"]).param_groups:
        opt.add_param_group(group)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg["warmup"], cfg["steps"]))
    hooks = _route_through_mlps(model)
    act_norms: list[torch.Tensor] = []  # mean |h| of each MLP in the current forward pass
    if cfg["act_l1"] > 0:
        for layer in model.model.language_model.layers:
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda _m, args: act_norms.append(args[0].abs().mean())))
    n = batch["input_ids"].shape[0]
    model.train()
    bar = _bar(cfg["steps"], "demo model 2/2: captioning", progress)
    loss_ema = None
    for step in bar:
        idx = torch.randint(0, n, (cfg["batch_size"],), generator=gen)  # [B]
        mb = {k: v[idx] for k, v in batch.items()}  # ids/labels/mask [B, T], pixel_values [B, 3, H, W]
        act_norms.clear()
        loss = model(**mb).loss
        if act_norms:  # L1 on the MLP activations: each concept carried by few neurons
            loss = loss + cfg["act_l1"] * torch.stack(act_norms).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_ema:.4f}", refresh=False)
    bar.close()
    for handle in hooks:
        handle.remove()
    model.eval()
    return float(loss_ema)


def _is_complete(path: Path) -> bool:
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (info.get("recipe_version") == RECIPE_VERSION
            and all((path / f).is_file() for f in ("config.json", "model.safetensors")))


def _remove_stale_builds(root: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete temp dirs of builds that were killed long ago (recent ones may still be running)."""
    now = time.time()
    for d in root.glob(f".{CACHE_SUBDIR}-*.tmp"):
        try:
            if now - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _isolated(fn, *args):
    """Run fn(*args) seeded, with BUILD_THREADS torch threads and without transformers' save/load
    progress bars; the caller's thread count, progress bars and RNG states are restored afterwards."""

    bars, threads = hf_logging.is_progress_bar_enabled(), torch.get_num_threads()
    py_state, np_state = random.getstate(), np.random.get_state()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(BUILD_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(TRAIN["seed"])
            np.random.seed(TRAIN["seed"])
            torch.manual_seed(TRAIN["seed"])
            return fn(*args)
    finally:
        torch.set_num_threads(threads)
        random.setstate(py_state)
        np.random.set_state(np_state)
        if bars:
            hf_logging.enable_progress_bar()


def build_demo_model(cache_dir: str | Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Return the demo checkpoint directory `<cache_dir>/demo-v{RECIPE_VERSION}`, training it first if needed.

    cache_dir: cache root (default `default_cache_dir()`). force: retrain even if a complete
    checkpoint exists. progress: tqdm bars and a one-line summary (held-out accuracy, time) on stderr.
    Building takes about 80 s on one CPU core; it happens in a temp dir renamed into place at
    the end, so an interrupted build never leaves a checkpoint that looks complete.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / CACHE_SUBDIR
    if not force and _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}-", suffix=".tmp", dir=root))
    old = tmp.with_name(tmp.name[:-len(".tmp")] + "-old.tmp")
    try:
        info = _isolated(_build_into, tmp, progress)
        mask = umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp (and safetensors) make 0700/0600: follow the umask
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~mask)
        if target.exists():  # incomplete, outdated or forced: move it aside, then swap ours in
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:  # a concurrent build put its checkpoint there first: keep that one
            if not _is_complete(target):
                raise
    finally:
        for d in (tmp, old):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
    if progress:
        log.info("demo model: held-out exact-match %.1f%% (n=%d), trained in %.0fs -> %s",
                 100 * info["heldout_accuracy"], info["n_eval"], info["train_seconds"], target)
    return target


def _build_into(out: Path, progress: bool) -> dict:
    """Train, save, reload-check and mark a checkpoint in `out`; returns the info written."""

    cfg = TRAIN
    t0 = time.perf_counter()
    processor = build_processor()
    model = _build_model(processor.tokenizer)
    if cfg["patch_loss"]:
        with_masks = make_examples_with_masks(cfg["n_train"], seed=cfg["seed"])
        train_examples = [(im, cap) for im, cap, _ in with_masks]
        batch = _training_tensors(processor, train_examples, _patch_colours(with_masks, processor.tokenizer))
    else:
        train_examples = make_examples(cfg["n_train"], seed=cfg["seed"])
        batch = _training_tensors(processor, train_examples)
    n_img = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    with torch.no_grad():  # the processor's image-token count must match the model's patch features
        feats = model.get_image_features(pixel_values=batch["pixel_values"][:1], vision_feature_layer=-1,
                                         vision_feature_select_strategy="default")
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        n_feat = feats[0].shape[0] if isinstance(feats, (list, tuple)) else feats.shape[-2]
    if n_img != n_feat or n_img != N_IMAGE_TOKENS:
        raise RuntimeError(f"processor inserts {n_img} image tokens but the model makes {n_feat} features")
    pretrain_vision(model, batch["pixel_values"], _aux_targets([c for _, c in train_examples]), progress)
    final_loss = train(model, batch, progress)
    train_seconds = time.perf_counter() - t0

    eval_examples = make_examples(cfg["n_eval"], seed=cfg["eval_seed"])
    preds = caption(model, processor, [im for im, _ in eval_examples])
    acc = sum(p == c for p, (_, c) in zip(preds, eval_examples)) / len(eval_examples)
    if acc < MIN_ACCURACY:
        raise RuntimeError(f"demo model reached only {100 * acc:.1f}% held-out caption accuracy "
                           f"(needs {100 * MIN_ACCURACY:.0f}%); the recipe is broken")

    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    model.generation_config.save_pretrained(out)

    # Reload exactly as users will, and check the reloaded model captions like the trained one.
    check = eval_examples[:16]
    proc2 = AutoProcessor.from_pretrained(str(out), local_files_only=True)
    model2 = LlavaForConditionalGeneration.from_pretrained(str(out), local_files_only=True)
    reloaded = caption(model2, proc2, [im for im, _ in check])
    if reloaded != caption(model, processor, [im for im, _ in check]) or reloaded[0] != check[0][1]:
        raise RuntimeError(f"the saved demo checkpoint does not reload to the trained model "
                           f"(captions {reloaded[:2]} for {[c for _, c in check[:2]]})")
    if prompt_text(proc2) != f"USER: {IMAGE}\n{DEMO_PROMPT} ASSISTANT:":
        raise RuntimeError("the saved chat template does not render the llava-1.5 prompt")

    info = {"recipe_version": RECIPE_VERSION, "heldout_accuracy": acc, "n_eval": cfg["n_eval"],
            "eval_seed": cfg["eval_seed"], "train_seconds": round(train_seconds, 2), "final_loss": final_loss,
            "prompt": DEMO_PROMPT, "prompt_text": prompt_text(processor), "n_image_tokens": N_IMAGE_TOKENS,
            "image_size": IMAGE_SIZE, "vocab_size": len(processor.tokenizer), "colours": list(COLOURS),
            "shapes": list(SHAPES), "train": cfg, "vision": VISION, "text": TEXT,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")  # written last: marks completeness
    return info
