"""`mmn bench`: how fast captioning and finding run on the user's model and hardware.

Per batch size, over the same `n_images` images (the first ones of a corpus, or random ones of the
processor's input size):

- caption: `engine.caption` (greedy, KV cache), the baseline;
- find: `engine.find` in one phase (generation with capture, then scoring);
- two-phase: the captions made by find, given back as token ids to `engine.find(images, captions=...)`
  (teacher forced: one forward pass scores them); its scoring phase alone, and caption + scoring.

Each is run on one warm-up batch, then `repeats` times over all the images; the median wall time is
reported (CUDA synchronised around each run). Peak memory is measured over the timed runs of each
phase: CUDA's `max_memory_allocated` (reset first), and the growth of the process' resident set above
where it stood (Linux: the VmHWM high-water mark, reset through /proc/self/clear_refs; elsewhere
getrusage's lifetime high-water mark, which only shows growth past every earlier peak). On CUDA, the
`act_score` op (the fused MLP step of find's prefill) is timed at the model's MLP width and each
batch's prefill rows, against a device-to-device copy.

Nothing here prints: `bench_table` formats a report, the CLI prints it.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import re
import resource
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import MMNError
from ..find.engine import DEFAULT_PROMPT, Engine, FindOptions
from ..kernels.timing import act_score_bandwidth, copy_bandwidth, median, wall_times
from ..model.inputs import MAX_IMAGE_BYTES
from .corpus import open_corpus
from .runinfo import library_versions, model_name

BENCH_FORMAT_VERSION = 1
CUDA_ONLY = "n/a (CUDA only)"
DEFAULT_IMAGE_SIZE = 336  # random images when the processor names no input size (llava-1.5's)
MIB = 1 << 20


@dataclass
class BenchSettings:
    """What `run_bench` measures. None: the default for the device (`resolved`)."""
    batch_sizes: list[int] | None = None  # CPU: 1 and 8; CUDA: 8 and 32
    n_images: int | None = None  # default: twice the largest batch size
    max_new_tokens: int = 32
    repeats: int = 3
    images: str | None = None  # a corpus (anything `mmn find --images` takes); None: random images
    prompt: str = DEFAULT_PROMPT
    concepts: str | list[str] = "all"
    top_k: int = 50
    max_image_bytes: int = MAX_IMAGE_BYTES

    def resolved(self, device: torch.device | str) -> "BenchSettings":
        """These settings with the defaults for `device` filled in and batch sizes deduplicated (in order)."""
        cuda = torch.device(device).type == "cuda"
        sizes = self.batch_sizes if self.batch_sizes else ([8, 32] if cuda else [1, 8])
        sizes = list(dict.fromkeys(sizes))
        n = self.n_images if self.n_images is not None else 2 * max((s for s in sizes if isinstance(s, int)),
                                                                   default=1)
        return dataclasses.replace(self, batch_sizes=sizes, n_images=n)

    def check(self) -> None:
        """Refuse values that cannot be measured (call on `resolved` settings), and a corpus that does
        not open, before any model is loaded."""
        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for size in self.batch_sizes or []:
            if not whole(size) or size < 1:
                raise MMNError(f"--batch-size must be at least 1, got {size}")
        for flag, value in (("--n-images", self.n_images), ("--max-new-tokens", self.max_new_tokens),
                            ("--repeats", self.repeats), ("--top-k", self.top_k)):
            if not whole(value) or value < 1:
                raise MMNError(f"{flag} must be at least 1, got {value}")
        largest = max(self.batch_sizes)
        if self.n_images < largest:
            raise MMNError(f"--n-images {self.n_images} is smaller than --batch-size {largest}: every measurement "
                           f"runs whole batches; give --n-images {largest} or more (default: twice the largest "
                           "batch size)")
        if self.images is not None:
            open_corpus(self.images, max_image_bytes=self.max_image_bytes)  # MMNError for a bad spec


# ------------------------------------------------------------------------------------ images
def image_size(engine: Engine) -> int:
    """The side, in pixels, of the square images the engine's image processor takes (crop size, else
    size), or DEFAULT_IMAGE_SIZE when it names none (or names pixel counts, as Qwen2-VL's do)."""
    ip = getattr(engine.processor, "image_processor", None) or engine.prompter.image_processor
    for attr, key in (("crop_size", "height"), ("size", "height"), ("size", "shortest_edge")):
        d = getattr(ip, attr, None)
        v = d.get(key) if isinstance(d, dict) else getattr(d, key, None)
        if isinstance(v, int) and 8 <= v <= 2048:
            return v
    return DEFAULT_IMAGE_SIZE


def noise_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """`n` deterministic RGB images of `size` x `size`: noise over a background, with a flat rectangle."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 48, size=(size, size, 3)) + rng.integers(0, 200, size=3)
        y0, x0 = rng.integers(0, max(1, size // 2), size=2)
        h, w = rng.integers(max(1, size // 4), size // 2 + 2, size=2)
        arr[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, size=3)
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


def corpus_images(spec: str, n: int, max_image_bytes: int = MAX_IMAGE_BYTES) -> list[Image.Image]:
    """The first `n` readable images of corpus `spec`, in its order (unreadable ones skipped). A
    corpus with fewer is cycled, with a warning; one with none is an MMNError."""
    corpus = open_corpus(spec, max_image_bytes=max_image_bytes)
    images, bad = [], []
    for shard in range(corpus.n_shards):
        for sample in corpus.iter_shard(shard):
            if sample.error is not None or sample.image is None:
                bad.append(f"{sample.key}: {sample.error}")
            else:
                images.append(sample.image)
            if len(images) == n:
                return images
    if not images:
        first = f" (first: {bad[0]})" if bad else ""
        raise MMNError(f"corpus '{spec}' holds no readable image{first}; give a folder or manifest of images")
    warnings.warn(f"corpus '{spec}' holds {len(images)} readable images, fewer than --n-images {n}: "
                  f"reusing them in order")
    return [images[i % len(images)] for i in range(n)]


# ------------------------------------------------------------------------------------ memory
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    """Reset this process' peak resident set (Linux 4.0+); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


class PeakMemory:
    """The peaks of one measurement: CUDA bytes allocated (`cuda`, None off CUDA) and resident-set growth
    above the start (`rss_increase`). `rss_method` says how the latter was read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda: int | None = None
        self.rss_increase = 0
        self.rss_method = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        rss = _proc_status_kib("VmRSS")
        if rss is not None and _reset_hwm():
            self.rss_method, self._start = "VmHWM", rss * 1024
        else:
            self.rss_method, self._start = "ru_maxrss", _maxrss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda = torch.cuda.max_memory_allocated(self.device)
        peak = (_proc_status_kib("VmHWM") or 0) * 1024 if self.rss_method == "VmHWM" else _maxrss_bytes()
        self.rss_increase = max(0, peak - self._start)


# ----------------------------------------------------------------------------------- running
@dataclass
class Phase:
    """One phase's figures at one batch size."""
    seconds: float  # median wall time over all the images
    times: list[float]
    cuda_peak_bytes: int | None
    rss_increase_bytes: int
    rss_method: str


def _phase(fn, warm, repeats: int, device: torch.device, bar) -> tuple[Phase, object]:
    warm()
    bar.update(1)
    with PeakMemory(device) as mem:
        times, result = wall_times(fn, repeats, device, after_each=lambda: bar.update(1))
    return Phase(median(times), times, mem.cuda, mem.rss_increase, mem.rss_method), result


def scored_neurons(engine: Engine) -> int:
    """Neurons a concept is scored over: n_layers x d_mlp, or for mixture-of-experts models every
    expert neuron (routed and shared) of every layer."""
    return engine.adapter.n_neurons


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def run_bench(engine: Engine, settings: BenchSettings, progress: bool = True) -> dict:
    """Measure `engine` as the module docstring says; returns the report (JSON-able, see docs/benchmarks.md)."""
    device = engine.device
    cuda = device.type == "cuda"
    s = settings.resolved(device)
    s.check()
    if s.images is not None:
        images, source = corpus_images(s.images, s.n_images, s.max_image_bytes), str(s.images)
    else:
        side = image_size(engine)
        images, source = noise_images(s.n_images, side), f"random {side}x{side}"
    neurons = scored_neurons(engine)
    find_opts = dict(prompt=s.prompt, concepts=s.concepts, top_k=s.top_k, max_new_tokens=s.max_new_tokens)
    engine.check_options(FindOptions(**find_opts))  # bad options (e.g. concept words): before any timing
    prompt_len = engine.encode(images[:1], s.prompt)["input_ids"].shape[1]
    dtype = engine.adapter.unit_weight(*engine.adapter.units()[0]).dtype  # the decoder's (a vision tower may differ)
    copy_bps = None
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        copy_bps = copy_bandwidth(device, int(min(1 << 30, free // 8)), repeats=10)

    rows = []
    per_row = 3 * (1 + s.repeats) + (1 if cuda else 0)
    with tqdm(total=len(s.batch_sizes) * per_row, desc="bench", unit="run", disable=not progress, file=sys.stderr, dynamic_ncols=True,
              mininterval=0.5) as bar:
        for b in s.batch_sizes:
            bar.set_postfix_str(f"batch {b}")
            start = bar.n
            try:
                rows.append(_row(engine, images, b, s, find_opts, neurons, prompt_len, dtype, copy_bps, bar))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({"batch_size": b, "error": "out of memory"})
                bar.update(start + per_row - bar.n)
    return {
        "format": "mmn-bench",
        "format_version": BENCH_FORMAT_VERSION,
        "model": {"source": engine.source, "name": model_name(engine), "class": type(engine.model).__name__,
                  "n_layers": engine.adapter.n_layers, "d_mlp": engine.adapter.d_mlp, "moe": engine.adapter.is_moe,
                  "neurons": neurons},
        "device": {"type": device.type, "name": device_name(device), "index": device.index,
                   "copy_gb_per_s": None if copy_bps is None else copy_bps / 1e9},
        "dtype": str(dtype).replace("torch.", ""),
        "backend": engine.backend,
        "versions": {**library_versions(), "triton": _triton_version()},
        "settings": {"batch_sizes": s.batch_sizes, "n_images": s.n_images, "max_new_tokens": s.max_new_tokens,
                     "repeats": s.repeats, "warmup_batches": 1, "images": source, "prompt": s.prompt,
                     "prompt_tokens": prompt_len, "concepts": s.concepts, "top_k": s.top_k},
        "rss_method": next((r["rss_method"] for r in rows if "rss_method" in r), None),
        "rows": rows,
    }


def _row(engine: Engine, images: list, b: int, s: BenchSettings, find_opts: dict, neurons: int, prompt_len: int,
         dtype: torch.dtype, copy_bps: float | None, bar) -> dict:
    device, n = engine.device, len(images)
    first = images[:b]
    caption, _ = _phase(
        lambda: engine.caption(images, prompt=s.prompt, max_new_tokens=s.max_new_tokens, batch_size=b),
        lambda: engine.caption(first, prompt=s.prompt, max_new_tokens=s.max_new_tokens, batch_size=b),
        s.repeats, device, bar)
    find, results = _phase(lambda: engine.find(images, batch_size=b, **find_opts),
                           lambda: engine.find(first, batch_size=b, **find_opts), s.repeats, device, bar)
    captions = [r.output_ids for r in results]
    scoring, forced = _phase(lambda: engine.find(images, captions=captions, batch_size=b, **find_opts),
                             lambda: engine.find(first, captions=captions[:b], batch_size=b, **find_opts),
                             s.repeats, device, bar)
    concepts = sum(len(r.concepts) for r in results)
    forced_concepts = sum(len(r.concepts) for r in forced)
    two_phase = caption.seconds + scoring.seconds

    def mib(v):
        return None if v is None else v / MIB

    row = {
        "batch_size": b,
        "images": n,
        "caption_s": caption.seconds, "caption_images_per_s": n / caption.seconds,
        "find_s": find.seconds, "find_images_per_s": n / find.seconds,
        "scoring_s": scoring.seconds, "scoring_images_per_s": n / scoring.seconds,
        "two_phase_s": two_phase, "two_phase_images_per_s": n / two_phase,
        "find_overhead": find.seconds / caption.seconds,
        "two_phase_overhead": two_phase / caption.seconds,
        "caption_tokens_per_image": sum(len(c) for c in captions) / n,
        "concepts": concepts, "concepts_two_phase": forced_concepts,
        "neurons_per_s": concepts * neurons / find.seconds,
        "neurons_per_s_two_phase": forced_concepts * neurons / two_phase,
        "times_s": {"caption": caption.times, "find": find.times, "scoring": scoring.times},
        "cuda_peak_mib": None if device.type != "cuda" else
        {"caption": mib(caption.cuda_peak_bytes), "find": mib(find.cuda_peak_bytes),
         "scoring": mib(scoring.cuda_peak_bytes)},
        "rss_increase_mib": {"caption": mib(caption.rss_increase_bytes), "find": mib(find.rss_increase_bytes),
                             "scoring": mib(scoring.rss_increase_bytes)},
        "rss_method": caption.rss_method,
        "act_score": None,
    }
    if copy_bps is not None:
        rows_n = b * prompt_len
        try:
            t, bps = act_score_bandwidth(rows_n, engine.adapter.d_mlp, dtype, device, engine.backend, captured=b)
            row["act_score"] = {"rows": rows_n, "d_mlp": engine.adapter.d_mlp, "ms": 1e3 * t,
                                "gb_per_s": bps / 1e9, "of_copy": bps / copy_bps}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            row["act_score"] = {"error": "out of memory"}
        bar.update(1)
    return row


# ------------------------------------------------------------------------------------ table
def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _si(v: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def bench_table(report: dict) -> str:
    """The report as text: a header, a throughput table and a memory / kernel table (a row per batch size)."""
    m, d, st, v = report["model"], report["device"], report["settings"], report["versions"]
    cuda = d["type"] == "cuda"
    lines = [
        f"model: {m['name']} ({m['class']}, {m['n_layers']} layers, {m['neurons']:,} neurons"
        f"{', mixture of experts' if m['moe'] else ''}), {report['dtype']}, backend {report['backend']}",
        f"device: {d['type']}" + (f":{d['index']}" if d["index"] is not None else "") + f" {d['name']}"
        + (f", copy bandwidth {d['copy_gb_per_s']:.0f} GB/s" if d["copy_gb_per_s"] else ""),
        f"versions: mmn_fast {v['mmn_fast']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"triton {v['triton'] or 'not installed'}",
        f"images: {st['n_images']} ({st['images']}), prompt {st['prompt_tokens']} tokens, at most "
        f"{st['max_new_tokens']} new tokens, concepts={st['concepts']}; medians of {st['repeats']} runs after a "
        "warm-up batch",
        "",
    ]
    ok = [r for r in report["rows"] if "error" not in r]
    failed = [[str(r["batch_size"]), r["error"]] for r in report["rows"] if "error" in r]
    thr = [[str(r["batch_size"]), _fmt(r["caption_images_per_s"], 2), _fmt(r["find_images_per_s"], 2),
            _fmt(r["find_overhead"], 2), _fmt(r["scoring_images_per_s"], 2), _fmt(r["two_phase_images_per_s"], 2),
            _fmt(r["two_phase_overhead"], 2), _fmt(r["caption_tokens_per_image"], 1),
            _si(r["neurons_per_s"])] for r in ok]
    lines.append(_table(["batch", "caption img/s", "find img/s", "find/caption", "scoring img/s",
                         "2-phase img/s", "2-phase/caption", "tokens/img", "neurons/s"], thr))
    lines.append("")

    def three(x: dict | None) -> str:
        return CUDA_ONLY if x is None else " / ".join(_fmt(x[k], 1) for k in ("caption", "find", "scoring"))

    def kernel(r: dict) -> list[str]:
        k = r["act_score"]
        if not cuda:
            return [CUDA_ONLY, CUDA_ONLY]
        if k is None or "error" in k:
            return [(k or {}).get("error", "-"), "-"]
        return [f"{k['gb_per_s']:.0f} ({k['rows']} x {k['d_mlp']})", f"{100 * k['of_copy']:.0f}%"]

    mem = [[str(r["batch_size"]), three(r["cuda_peak_mib"]), three(r["rss_increase_mib"]), *kernel(r)] for r in ok]
    lines.append(_table(["batch", "CUDA peak MiB caption/find/scoring", "RSS growth MiB caption/find/scoring",
                         "act_score GB/s (rows x F)", "of copy bandwidth"], mem))
    if failed:
        lines += ["", *(f"batch {b}: {e}" for b, e in failed)]
    return "\n".join(lines)
