"""The engine: load a VLM through one path, caption with the KV cache, score concept tokens."""
from __future__ import annotations

import importlib.util
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import transformers
from torch import nn
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase

from ..errors import MMNError
from ..io import tensor_fingerprint
from ..model.adapters import Adapter, spec_for
from ..model.backend import resolve_backend
from ..model.inputs import ImageItem, Prompter, as_image, teacher_forced
from ..model.live import apply_patch, model_lock, patched as patched_context
from ..model.request_patches import BatchPatches, PatchRegistry
from .capture import capture, gather_positions, last_position
from .concepts import NounTagger, check_word_list, resolve_mode, select_concepts, split_words
from .fused import fused_capture, fused_problem
from .generation import Generated, RowStreamer, Sampling, cache_kwargs
from .grad import grad_scores, moe_grad_parts
from .moe_scoring import concept_parts, image_parts, moe_capture, top_neurons
from .results import ConceptResult, ImageResult
from .scoring import Scorer

DEFAULT_PROMPT = "Describe the image."
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class FindOptions:
    prompt: str = DEFAULT_PROMPT
    prefix: str | None = None
    concepts: str | list[str] = "auto"
    activation: str = "down_proj_input"  # or "act_fn" (the paper's released code)
    top_k: int = 50
    max_new_tokens: int = 32
    batch_size: int = 8
    fold_final_norm: bool = False
    positions: str = "last"  # or "image"
    reduce: str = "mean"  # over image positions: "mean" or "max"
    method: str = "act"  # or "grad" (activation x gradient baseline)

    def validate(self) -> None:
        checks = [
            (self.activation in ("down_proj_input", "act_fn"), f"activation must be 'down_proj_input' or 'act_fn', got {self.activation!r}"),
            (self.positions in ("last", "image"), f"positions must be 'last' or 'image', got {self.positions!r}"),
            (self.reduce in ("mean", "max"), f"reduce must be 'mean' or 'max', got {self.reduce!r}"),
            (self.method in ("act", "grad"), f"method must be 'act' or 'grad', got {self.method!r}"),
            (self.top_k >= 1, f"top_k must be at least 1, got {self.top_k}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (not (self.fold_final_norm and self.positions == "image"), "fold_final_norm applies to positions='last' only"),
            (not (self.method == "grad" and self.positions == "image"), "method='grad' scores positions='last' only"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MMNError(msg)


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto",):
        return None
    if dtype not in _DTYPES:
        raise MMNError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _load_model(path: Path, dtype: torch.dtype | None, device_map=None) -> nn.Module:
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise MMNError("device_map needs the accelerate package: pip install accelerate")
        kwargs["device_map"] = device_map
    errors = []
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        try:
            return auto.from_pretrained(str(path), **kwargs)
        except ValueError as e:  # this Auto class does not know the config
            errors.append(f"{name}: {str(e).splitlines()[0]}")
        except OSError as e:
            raise MMNError(f"cannot load model weights from '{path}': {str(e).splitlines()[0]}") from None
    raise MMNError(f"no Auto class loads the checkpoint at '{path}' ({'; '.join(errors)}); load the model "
                   "yourself and pass it to mmn_fast.load(model, processor=...)")


def _load_processor(path: Path):
    """(processor or None, tokenizer, image_processor or None, why AutoProcessor failed or None) from a
    local checkpoint."""
    why = None
    try:
        proc = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as e:  # ImportError: a class needing torchvision
        proc, why = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
    if proc is not None and not isinstance(proc, PreTrainedTokenizerBase) and hasattr(proc, "tokenizer"):
        return proc, proc.tokenizer, getattr(proc, "image_processor", None), None
    try:
        tokenizer = proc if isinstance(proc, PreTrainedTokenizerBase) else AutoTokenizer.from_pretrained(
            str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise MMNError(f"no tokenizer in '{path}': {str(e).splitlines()[0]}; save one beside the weights") from None
    return None, tokenizer, _checkpoint_image_processor(path), why


def _checkpoint_image_processor(path: Path):
    """The checkpoint's image processor, or None when it has none."""
    try:
        return AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        return None
    except ImportError:  # some transformers 5.x releases gate AutoImageProcessor on torchvision
        return _image_processor_by_name(path)


def _image_processor_by_name(path: Path):
    """The image processor class that preprocessor_config.json names (its PIL variant first, which
    needs no torchvision), or None when the file or the class is missing."""
    try:
        name = json.loads((path / "preprocessor_config.json").read_text())["image_processor_type"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for cls_name in (f"{name}Pil", name.removesuffix("Fast")):
        try:
            return getattr(transformers, cls_name).from_pretrained(str(path), local_files_only=True)
        except (AttributeError, ImportError, OSError, ValueError):
            continue
    return None


def _check_device(device) -> None:
    """A device string torch understands and this machine has (before any weights are loaded)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MMNError(f"unknown device '{device}' ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MMNError(f"device '{device}' asked for, but CUDA is not available here (torch "
                           f"{torch.__version__}); use --device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MMNError(f"device '{device}' asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")


def load(path_or_model, processor=None, device=None, dtype=None, n_image_tokens: int | None = None,
         backend: str | None = None, device_map=None, kv_cache: str = "auto", **spec_overrides) -> "Engine":
    """Load a local Hugging Face checkpoint (never downloads), or wrap an already loaded model.

    processor: an HF processor, or a tokenizer (then image inputs are composed from `image_processor`
        in spec_overrides' absence via the checkpoint's image processor).
    device_map: e.g. "auto" to spread one model over several GPUs (needs accelerate); then `device`
        is ignored.
    backend: "auto" | "triton" | "torch" kernels (default $MMN_BACKEND, else "auto": Triton on CUDA).
    kv_cache: "auto" | "static" | "dynamic": the KV cache captions are decoded with (`Engine.kv_cache`;
        "auto": static on CPU where the model supports it; the same tokens either way).
    spec_overrides: module paths overriding the adapter (layers, mlp, out_proj, act_fn, unembed,
        final_norm, prompt_template), for models the registry and discovery do not cover.
    """
    dtype = _resolve_dtype(dtype)
    _check_device(device)
    image_processor = spec_overrides.pop("image_processor", None)
    source, processor_problem = None, None
    if isinstance(path_or_model, (str, Path)):
        path = Path(path_or_model)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise MMNError(f"model path '{path}' is not a local Hugging Face checkpoint (a folder with "
                           "config.json); mmn_fast never downloads: save or copy the checkpoint locally first")
        model = _load_model(path, dtype, device_map)
        source = str(path)
        if processor is None:
            processor, tokenizer, image_processor, processor_problem = _load_processor(path)
        else:
            tokenizer = getattr(processor, "tokenizer", processor)
            if tokenizer is processor and image_processor is None:  # a tokenizer: images need the checkpoint's
                image_processor = _checkpoint_image_processor(path)
    elif isinstance(path_or_model, nn.Module):
        model = path_or_model
        if processor is None:
            raise MMNError("pass processor=... (a Hugging Face processor or tokenizer) with an already loaded model")
        tokenizer = getattr(processor, "tokenizer", processor)
        if dtype is not None:
            model = model.to(dtype)
    else:
        raise MMNError(f"load() takes a checkpoint path or an nn.Module, not {type(path_or_model).__name__}")
    if processor is tokenizer:
        processor = None
    if device_map is None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = model.to(device)
    model = model.eval()
    engine = Engine(model, tokenizer, processor, image_processor, source=source,
                    n_image_tokens=n_image_tokens, spec_overrides=spec_overrides, backend=backend, kv_cache=kv_cache)
    if processor_problem and not engine.prompter.can_place_images():
        raise MMNError(f"the checkpoint's processor could not be loaded ({processor_problem}), and without it the "
                       "number of image tokens per image is unknown: install what it needs (many VLM processors "
                       "need torchvision), or pass processor=... (or n_image_tokens=...) to mmn_fast.load()")
    return engine


class Engine:
    """A model with its adapter, prompter and scorer. `find()` is the main entry point."""

    def __init__(self, model, tokenizer, processor=None, image_processor=None, source=None,
                 n_image_tokens=None, spec_overrides=None, backend: str | None = None, kv_cache: str = "auto"):
        self.model, self.tokenizer, self.processor, self.source = model, tokenizer, processor, source
        cfg = getattr(model, "config", None)
        if any(getattr(c, "is_encoder_decoder", False) for c in (cfg, getattr(cfg, "text_config", None))):
            raise MMNError(f"{type(model).__name__} is an encoder-decoder model (its text decoder reads an encoder's "
                           "output through cross-attention): mmn_fast scores the MLP neurons of decoder-only language "
                           "models, as the method defines them; this architecture is not supported")
        self.adapter = Adapter(model, spec_for(model, spec_overrides))
        if self.adapter.is_moe and next(model.parameters()).dtype == torch.float64 and hasattr(
                model, "set_experts_implementation"):
            model.set_experts_implementation("eager")  # transformers' default grouped_mm takes no float64
        self.backend = resolve_backend(backend, self.device, fused_problem(self.adapter))
        # Triton backend: also run the fused kernel at one-position decode steps, which otherwise take
        # the model's own ops (`bench/run_bench.py --gpu` times both; that should settle the default).
        self.decode_with_kernel = False
        cache_kwargs(model, kv_cache)  # validates the choice now
        self.kv_cache = kv_cache  # "auto" | "static" | "dynamic" (find/generation.py, cache_kwargs)
        cfg = model.config
        n_img = n_image_tokens or getattr(cfg, "num_image_tokens", None)
        image_token = (tokenizer.convert_ids_to_tokens(self.adapter.image_token_id)
                       if self.adapter.image_token_id is not None else None)
        self.prompter = Prompter(tokenizer, processor, image_processor, self.adapter.spec.prompt_template,
                                 image_token, n_img)
        # Models with a multimodal rope (Qwen2-VL, Qwen2.5-VL, GLM-4V) compute their own position ids;
        # 1-D ones given to them would be wrong after the image.
        self._own_positions = any(hasattr(m, "get_rope_index") for m in (model, getattr(model, "model", None)))
        self._scorers: dict[bool, Scorer] = {}  # per fold_final_norm: projections cached across find calls
        self.tagger = NounTagger()  # spaCy, loaded on the first find that picks nouns
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

        self.swap_lock = model_lock(model)  # held by each find batch, caption batch and patch swap
        # Generation never writes the image placeholder token: the model's forward would take it for an image
        # position, so a caption holding it could not be fed back (teacher forcing, the grad method).
        self.no_placeholder = ({"suppress_tokens": [self.adapter.image_token_id]}
                               if self.adapter.image_token_id is not None else {})
        # Per-request patches (caption/find(..., patches=[...])): named ones live here.
        self.patches = PatchRegistry(model, self.adapter, self.backend)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        """Hash of the scored weights (all W_out and W_U): keys caches and records runs. Computed
        afresh each time (a strided sample, cheap), so a patch, a cast or an edit
        through `.data` (which bypasses version counters) is always seen."""
        return tensor_fingerprint(self.adapter.scored_weights())

    def fingerprints_of_this_model(self) -> set[str]:
        """The fingerprint and the one mmn_fast recorded before its sampling fix (io.tensor_fingerprint
        version 1): what a run of these weights may hold."""
        ws = self.adapter.scored_weights()
        return {tensor_fingerprint(ws), tensor_fingerprint(ws, version=1)}

    # ------------------------------------------------------------------ inputs
    def encode(self, images: list, prompt: str = DEFAULT_PROMPT, prefix: str | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for `images` (PIL) under one prompt (+ prefix), left-padded, on the model's
        device (floating tensors in its dtype)."""
        return self.prompter.encode(images, prompt, prefix, self.device, next(self.model.parameters()).dtype)

    def _caption_ids(self, caption) -> list[int]:
        if isinstance(caption, str):
            return self.tokenizer(caption, add_special_tokens=False)["input_ids"]
        return [int(t) for t in caption]

    def teacher_forced(self, inputs: dict, captions: list[list[int]]) -> tuple[dict, torch.Tensor]:
        """`inputs` (from `encode`) with each caption (token ids) appended, right-padded; and index
        [B, S] of the positions that predict each caption token (clamped past a caption's end)."""
        # A multimodal rope (Qwen2-VL style) derives its 3-D positions from the mask itself.
        position_ids = not self._own_positions and "position_ids" in inspect.signature(self.model.forward).parameters
        return teacher_forced(inputs, captions, self.prompter.pad_token_id, position_ids)

    def _trim(self, out: list[int]) -> list[int]:
        """Generated ids up to and including the first end-of-sequence token."""
        for j, tok in enumerate(out):
            if tok in self.eos_ids:
                return out[: j + 1]
        return out

    # ------------------------------------------------------------------ find
    def find(self, images: Iterable, **options) -> list[ImageResult]:
        """Caption each image and score every concept token. See `iter_find` for the options."""
        return list(self.iter_find(images, **options))

    def iter_find(self, images: Iterable, captions: list | None = None, ids: list[str] | None = None,
                  progress=None, keep_scores: bool = False, patches: list | None = None,
                  **options) -> Iterator[ImageResult]:
        """Yield one `ImageResult` per image, batch by batch.

        images: PIL images, paths or `ImageItem`s. captions: optional texts (or token id lists),
        one per image: teacher-forced mode, one forward pass scores every concept position.
        options: the fields of `FindOptions`. progress: a tqdm-like bar updated per image.
        keep_scores: attach every neuron's score to each concept (`ConceptResult.scores`, [L, F]
        fp32 on CPU, not serialised), for corpus-level aggregates.
        patches: one entry per image (None: the base model; a registered name, a path, a `Patch`, or a
        list of those, stacked in order): each image is captioned and scored with its patch, the
        patched output vectors included, in shared batches; no weight changes (`engine.patches`).
        """
        opts = FindOptions(**options)
        mode = self.check_options(opts)
        if opts.fold_final_norm not in self._scorers:
            self._scorers[opts.fold_final_norm] = Scorer(self.adapter, fold_norm=opts.fold_final_norm)
        scorer = self._scorers[opts.fold_final_norm]
        if isinstance(images, (str, Path, ImageItem)) or hasattr(images, "convert"):  # one image, not a list
            images = [images]
        try:
            items = list(images)
        except TypeError:
            raise MMNError(f"images must be a list of PIL images, paths or ImageItems, not "
                           f"{type(images).__name__}") from None
        if captions is not None and len(captions) != len(items):
            raise MMNError(f"{len(captions)} captions for {len(items)} images: give one caption per image")
        stacks = self.patches.resolve(patches, len(items))  # names looked up once, when the call starts
        if keep_scores or (stacks is not None and any(stacks)):  # rows all on the base model need nothing more
            self.adapter.require_dense("a corpus run (per-concept aggregates)" if keep_scores else
                                       "find with per-request patches")
        for start in range(0, len(items), opts.batch_size):
            batch = items[start : start + opts.batch_size]
            caps = None if captions is None else captions[start : start + opts.batch_size]
            batch_ids = ids[start : start + opts.batch_size] if ids is not None else None
            rows = None if stacks is None else stacks[start : start + opts.batch_size]
            yield from self._find_batch(batch, caps, batch_ids, opts, mode, scorer, start, keep_scores, rows)
            if progress is not None:
                progress.update(len(batch))

    def check_options(self, opts: FindOptions):
        """Validate `opts` against this model (option values, concept words); returns the concept mode."""
        opts.validate()
        if opts.positions == "image" and self.adapter.cross_attention:
            raise MMNError(f"positions='image' is not defined for {type(self.model).__name__}: its text decoder sees the "
                           "image through cross-attention, not as image tokens in the sequence; use positions='last'")
        if self.adapter.is_moe:
            if opts.activation == "act_fn":
                self.adapter.require_dense("find with activation='act_fn'")
        mode = resolve_mode(opts.concepts, self.tagger)
        if isinstance(mode, list):
            check_word_list(self.tokenizer, mode)
        return mode

    def _find_batch(self, batch, caps, batch_ids, opts: FindOptions, mode, scorer: Scorer, offset: int,
                    keep_scores: bool = False, stacks: list | None = None):
        pil = [as_image(x) for x in batch]
        inputs = self.encode(pil, opts.prompt, opts.prefix)
        prompt_len = inputs["input_ids"].shape[1]
        if caps is not None:
            outputs = [self._caption_ids(c) for c in caps]
            run_inputs, index = self.teacher_forced(inputs, outputs)
            select = gather_positions(index)
        else:
            run_inputs, select = inputs, last_position
        image_mask = None
        if opts.positions == "image":
            if self.adapter.image_token_id is None:
                raise MMNError("positions='image' needs the image token id in the model config (image_token_id)")
            image_mask = run_inputs["input_ids"] == self.adapter.image_token_id
        # swap_lock: the whole batch (generation, capture and scoring, the grad method's forward
        # included) sees one patch state (see live.py)
        with self.swap_lock, self.patches.active(stacks) as plan:
            with torch.no_grad(), self._capture(opts, select, image_mask) as store:
                if caps is None:
                    seq = self.model.generate(**inputs, max_new_tokens=opts.max_new_tokens, do_sample=False,
                                              num_beams=1, use_cache=True, **self.generate_options())
                    outputs = [self._trim(row) for row in seq[:, prompt_len:].tolist()]
                else:
                    self.model(**run_inputs, use_cache=False)
            records = self._concepts(outputs, mode)
            flat = [(b, w) for b, ws in enumerate(records) for w in ws]
            neurons, scores = self._score(flat, outputs, store, scorer, opts, inputs, plan) if flat else ([], None)
        if keep_scores and scores is not None:
            scores = scores.float().cpu()  # [C, L, F]
        k = 0
        for b, item in enumerate(batch):
            cons = []
            for word in records[b]:
                con = ConceptResult(word.text, outputs[b][word.step], word.step, neurons[k])
                if keep_scores:
                    con.scores = scores[k]  # [L, F]
                cons.append(con)
                k += 1
            mask = inputs["attention_mask"][b].bool()
            name = item.image if isinstance(item, ImageItem) else (str(item) if isinstance(item, (str, Path)) else "")
            rid = batch_ids[b] if batch_ids is not None else (item.id if isinstance(item, ImageItem) else str(offset + b))
            yield ImageResult(id=rid, image=name, prompt_ids=inputs["input_ids"][b][mask].tolist(),
                              output_ids=outputs[b], caption=self.caption_text(outputs[b]), concepts=cons)

    def _capture(self, opts: FindOptions, select, image_mask):
        """The fused MLP forward on the Triton backend; forward hooks on the torch backend; for models with
        mixture-of-experts layers, what their expert neurons' scores need (moe_scoring)."""
        if self.adapter.is_moe:
            return moe_capture(self.adapter, select, image_mask, opts.fold_final_norm)
        if self.backend == "triton":
            return fused_capture(self.adapter, "triton", opts.activation, select, image_mask, opts.reduce,
                                 opts.fold_final_norm, self.decode_with_kernel)
        return capture(self.adapter, opts.activation, select, opts.fold_final_norm, image_mask)

    def generate_options(self) -> dict:
        """What every `generate` call of the engine adds: the KV cache, and no image placeholder tokens."""
        return {**cache_kwargs(self.model, self.kv_cache), **self.no_placeholder}

    def caption_text(self, output_ids: list[int]) -> str:
        return self.tokenizer.decode(output_ids, skip_special_tokens=True).strip()

    def _concepts(self, outputs: list[list[int]], mode) -> list:
        picked = []
        for out in outputs:
            text, words = split_words(self.tokenizer, out)
            picked.append(select_concepts(text, words, mode, self.tagger))
        return picked

    def _score(self, flat, outputs, store, scorer: Scorer, opts: FindOptions, inputs,
               plan: BatchPatches | None = None) -> list:
        b_idx = torch.tensor([b for b, _ in flat])
        s_idx = torch.tensor([w.step for _, w in flat])
        tokens = [outputs[b][w.step] for b, w in flat]
        if self.adapter.is_moe:  # [[layer, expert, index, score], ...] per concept
            if opts.method == "grad":
                parts = moe_grad_parts(self, inputs, outputs, flat)
            elif opts.positions == "image":
                parts = [image_parts(self.adapter, store, b, t, opts.reduce) for (b, _w), t in zip(flat, tokens)]
            else:
                parts = [concept_parts(self.adapter, store, b, w.step, t, scorer) for (b, w), t in zip(flat, tokens)]
            return [top_neurons(p, opts.top_k) for p in parts], None
        # per-request patches: each concept is scored with its row's output vectors
        edits = None if plan is None else [{l: (e.idx, e.new) for l, e in plan.row_edits(b).items()} for b, _ in flat]
        if opts.method == "grad":
            scores = grad_scores(self, inputs, outputs, flat, opts)
        elif opts.positions == "image":
            stats = store.image_stats()
            dev = stats["count"].device
            per = {k: v[b_idx.to(dev)] for k, v in stats.items()}
            scores = scorer.score_image(per, tokens, opts.reduce, edits)
        else:
            acts = store.acts()  # [B, S, L, F]
            dev = acts.device
            norm_in = store.norm_inputs()[b_idx.to(dev), s_idx.to(dev)] if opts.fold_final_norm else None
            scores = scorer.score(acts[b_idx.to(dev), s_idx.to(dev)], tokens, norm_in, edits)
        return Scorer.top(scores, opts.top_k), scores

    # ------------------------------------------------------------------ patches (live.py, patch.py)
    def apply(self, patch, force: bool = False):
        """Apply a patch (a Patch or a .mmnpatch.safetensors path) in place; returns a handle with revert()."""

        return apply_patch(self, patch, force=force)

    def patched(self, patch, force: bool = False):
        """`with engine.patched("red2blue.mmnpatch.safetensors"): ...`: applied, and reverted on exit."""

        return patched_context(self, patch, force=force)

    def caption(self, images, prompt: str = DEFAULT_PROMPT, prefix: str | None = None, max_new_tokens: int = 32,
                batch_size: int = 8, patches: list | None = None) -> list[str]:
        """Greedy captions; each batch is generated under swap_lock, so it sees one patch state.
        patches: one entry per image (see `iter_find`): rows with different patches share batches."""
        images, out = list(images), []
        stacks = self.patches.resolve(patches, len(images))  # names looked up once, when the call starts
        for s in range(0, len(images), batch_size):
            batch = images[s : s + batch_size]
            rows = None if stacks is None else stacks[s : s + batch_size]
            done = self.generate(batch, [prompt] * len(batch), max_new_tokens, rows, prefix=prefix)
            out += [self.caption_text(r) for r in done.ids]
        return out

    def generate(self, images: list, prompts: list[str], max_new_tokens: int | list[int], patches: list | None = None,
                 sampling: Sampling | None = None, on_token=None, prefix: str | None = None) -> Generated:
        """One batch: image i continued after prompts[i], up to max_new_tokens (one per row, or one for
        all), each row with its patch (see `iter_find`), greedy unless `sampling` says otherwise (a
        seed then makes the batch reproducible without touching the global RNG). on_token(row, id) is
        called for each new token as it is made. Returns each row's new ids, trimmed after the first
        EOS and to its own limit, and its prompt's length in tokens."""
        n = len(images)
        limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
        if len(limits) != n or len(prompts) != n or min(limits, default=1) < 1:
            raise MMNError("generate needs one prompt and one max_new_tokens >= 1 per image")
        sampling = sampling or Sampling()
        stacks = patches if patches is None or all(isinstance(p, tuple) for p in patches) else self.patches.resolve(
            patches, n)
        inputs = self.encode([as_image(x) for x in images], list(prompts), prefix)
        streamer = RowStreamer(on_token) if on_token is not None else None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), self.swap_lock, self.patches.active(stacks), torch.random.fork_rng(devices):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            seq = self.model.generate(**inputs, max_new_tokens=max(limits), streamer=streamer, use_cache=True,
                                      **sampling.generate_kwargs(), **self.generate_options())
        rows = seq[:, inputs["input_ids"].shape[1]:].tolist()
        return Generated([self._trim(r)[:m] for r, m in zip(rows, limits)], inputs["attention_mask"].sum(1).tolist())
