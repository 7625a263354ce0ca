"""`mmn report DIR`: one self-contained HTML file for a finished find run (no server, no external file).

Images are embedded as base64 PNG data URIs and the layer plot is inline SVG. Sections: run summary,
distribution of the concepts' top neurons over layers, per concept a table of top neurons (layer,
index, images, mean score, the sign of its activation at the concept and the tokens it promotes given
that sign) and example heatmaps, the metrics (DIR/metrics.json) and the
edits (patch files in DIR, DIR/edits, DIR/patches).

Only the run's own files are read or embedded: regular files whose real path lies inside DIR (a
heatmap PNG, heatmaps/, metrics.json or patch file that links elsewhere is left out; the last three
with a note). What is read
is checked: a malformed concepts.json or results.jsonl is one MMNError naming the file and field; a
malformed metrics.json is left out with a note naming the field.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from pathlib import Path

from ..edit.methods import word_token
from ..errors import MMNError
from ..find.heatmap import maps, read_heatmaps, unique_name
from ..find.vocab import activation_signs, concept_tokens, promoted_tokens
from ..io import atomic_open
from ..model.inputs import load_image
from ..model.patch_file import SUFFIX, load_patch
from ..run.aggregate import RERUN, inside_run, open_results, outside_run, run_file
from ..run.runinfo import check_run_model, ids_digest

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 8px;border-bottom:2px solid #dde1e8;padding-bottom:4px}
h3{font-size:16px;margin:22px 0 6px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:14px 16px;margin:10px 0}
pre{white-space:pre-wrap;overflow-wrap:anywhere;max-width:100%}.card{overflow-x:auto}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 9px;border-bottom:1px solid #e6e9ef;text-align:left}
th{background:#f0f2f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#667085}.tok{font-family:ui-monospace,Menlo,Consolas,monospace;background:#eef1f6;border-radius:3px;padding:0 3px;margin-right:3px}
.good{color:#067647;font-weight:600}.figs{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:6px}figure img{display:block;width:176px;height:auto;image-rendering:pixelated}
figcaption{font-size:12px;color:#475467;max-width:176px}
nav a{margin-right:10px}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return _e(v)


def data_uri(img) -> str:
    """A PIL image as a base64 PNG data URI."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def layer_svg(counts: list[int], title: str = "", width: int = 720, height: int = 240) -> str:
    """Inline SVG bar chart of counts per layer."""
    n = max(1, len(counts))
    top = max(max(counts, default=0), 1)
    left, bottom, pad = 44, 34, 10
    bw = (width - left - pad) / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{_e(title)}"><rect width="100%" height="100%" fill="#fff"/>']
    plot_h = height - bottom - pad
    for frac in (0, 0.5, 1):
        y = pad + plot_h * (1 - frac)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - pad}" y2="{y:.1f}" stroke="#e4e7ec"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#475467">{top * frac:.0f}</text>')
    step = max(1, n // 16)
    for l, c in enumerate(counts):
        h = plot_h * c / top
        x = left + l * bw
        parts.append(f'<rect x="{x + bw * 0.1:.1f}" y="{pad + plot_h - h:.1f}" width="{bw * 0.8:.1f}" height="{h:.1f}" '
                     f'fill="#3e6fd8"><title>layer {l}: {c}</title></rect>')
        if l % step == 0:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{height - bottom + 14}" font-size="11" text-anchor="middle" '
                         f'fill="#475467">{l}</text>')
    parts.append(f'<text x="{left + (width - left) / 2:.0f}" y="{height - 4}" font-size="12" text-anchor="middle" '
                 f'fill="#1d2330">layer</text></svg>')
    return "".join(parts)


def _table(header: list[str] | None, rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if j in numeric else f"<td>{c}</td>"
                                    for j, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _promoted(engine, res, summary: dict, words: list[str], n: int, k: int) -> dict:
    """(word, layer, index) -> (sign, tokens): the sign of each of a concept's top-n neurons' activation
    there and the k tokens it promotes given it (`activation_signs`, `promoted_tokens`); the concept's
    token is the one the run scored (read from the first records naming it), else the tokenizer's."""
    if engine is None or not words:
        return {}
    try:
        token_ids = concept_tokens(res, words)
    except (OSError, ValueError, AttributeError):  # no readable results.jsonl: the tokenizer's token below
        token_ids = {}
    fold = bool((res.run.get("options") or {}).get("fold_final_norm"))
    keys, neurons, signs = [], [], []
    for w in words:
        top = summary[w]["neurons"][:n]
        ns = [(x["layer"], x["index"]) for x in top]
        try:
            tok = token_ids[w] if w in token_ids else word_token(engine.tokenizer, w)
        except MMNError:  # a word the tokenizer cannot spell: no tokens shown for it
            continue
        signs += activation_signs(engine, tok, ns, [x["mean_score"] for x in top], fold)
        keys += [(w, l, i) for l, i in ns]
        neurons += ns
    toks = promoted_tokens(engine, neurons, signs, k)
    return {key: (s, t) for key, s, t in zip(keys, signs, toks)}


def _examples(engine, res, words: list[str], per_concept: int, n: int, method: str) -> dict:
    """word -> [(caption, overlay uri, masked uri)] computed now for the first images naming it."""
    if engine is None or per_concept <= 0:
        return {}
    want = {w: [] for w in words}
    for rec in res:
        seen = set()
        for c in rec["concepts"]:
            w = c["word"].lower()
            if w in want and w not in seen and len(want[w]) < per_concept and c["neurons"]:
                seen.add(w)
                want[w].append((rec, c))
        if all(len(v) >= per_concept for v in want.values()):
            break
    out = {}
    ro = res.run.get("options") or {}
    ad = engine.adapter
    for w, pairs in want.items():
        imgs, items, caps = [], [], []
        for rec, c in pairs:
            off = next((x for x in c["neurons"][:n] if not (x[0] < ad.n_layers and x[1] < ad.d_mlp)), None)
            if off is not None:
                raise MMNError(f"'{res.path / 'results.jsonl'}': record '{rec['id']}' names neuron {off[:2]} of "
                               f"'{w}', outside the model ({ad.n_layers} layers x {ad.d_mlp} neurons); {RERUN}")
            try:
                imgs.append(load_image(rec["image"]))
            except MMNError:
                continue
            items.append((len(imgs) - 1, [tuple(x[:2]) for x in c["neurons"][:n]], c["token_id"], rec["output_ids"], c["step"]))
            caps.append(rec["caption"])
        if not items:
            continue
        try:
            hms = maps(engine, imgs, items, method, prompt=ro.get("prompt", "Describe the image."),
                       prefix=ro.get("prefix"), activation=ro.get("activation", "down_proj_input"))
        except MMNError as e:  # e.g. no patch grid (InstructBLIP): say so once
            return {"_error": str(e)}
        out[w] = [(cap, data_uri(hm.overlay(display_min=0)), data_uri(hm.masked(display_min=0))) for cap, hm in zip(caps, hms)]
    return out


def _patches(root: Path) -> list[str]:
    found = []
    for d in (root, root / "edits", root / "patches"):
        if d.is_dir():
            found += sorted(d.glob(f"*{SUFFIX}"))
    blocks = []
    for p in found:
        why = outside_run(root, p)
        if why:
            blocks.append(f'<div class="card"><b>{_e(p.name)}</b>: not read (it {_e(why)})</div>')
            continue
        try:
            patch = load_patch(p)
        except MMNError as e:
            blocks.append(f'<div class="card"><b>{_e(p.name)}</b>: cannot read ({_e(e)})</div>')
            continue
        ev = patch.params.get("evaluation") if isinstance(patch.params, dict) else None
        table = ""
        if ev:
            rows = [[_e(r.get("method")), _e(r.get("neurons")), _e(r.get("criterion")), _num(r.get("success")),
                     _num(r.get("generality")), _num(r.get("locality"))] for r in ev]
            table = _table(["method", "neurons", "criterion", "success", "generality", "locality"], rows, {3, 4, 5})
        blocks.append(f'<div class="card"><b>{_e(p.name)}</b><pre>{_e(patch.describe())}</pre>{table}</div>')
    return blocks


def _ratio(top, rnd) -> str:
    """The "top / random" cell: "-" unless the control is positive (a ratio to a zero or negative control,
    or of two values near zero, says nothing); highlighted when top is positive and 1.5x the control."""
    if top is None or rnd is None or rnd <= 1e-9 or (abs(top) <= 1e-9 and abs(rnd) <= 1e-9):
        return "-"
    text = f"{top / rnd:.1f}x"
    return f'<span class="good">{text}</span>' if top > 0 and top > 1.5 * rnd else text


def _metrics_section(metrics: dict) -> str:
    rows = [[_e(r["label"]), _num(r["top"]), _num(r["random"]), _ratio(r["top"], r["random"])]
            for r in metrics.get("summary", {}).values()]
    o = metrics.get("options", {})
    parts = [f'<p class="muted">top-n = {_e(o.get("n"))} neurons per concept against {_e(o.get("random_sets"))} random sets '
             f'of as many neurons; {_e(metrics.get("records"))} images. Definitions: docs/metrics.md.</p>',
             _table(["metric (mean over concepts)", "top-n", "random / other", "top / random"], rows, {1, 2, 3})]
    per_rows = []
    for w, v in metrics.get("concepts", {}).items():
        g = lambda *path: _num(_dig(v, path))  # noqa: E731
        per_rows.append([_e(w), _e(v.get("images")), g("semantic", "top", "hit_rate"), g("region", "top", "jaccard"),
                         g("cross_image", "within", "jaccard"), g("cross_image", "across", "jaccard"),
                         g("specificity", "top", "auroc"), g("causal", "zero", "top", "disappear"),
                         g("causal", "zero", "random", "disappear")])
    if per_rows:
        parts.append("<h3>Per concept</h3>" + _table(
            ["concept", "images", "semantic hit", "region J", "cross J same", "cross J other", "AUROC",
             "zero: disappear", "random: disappear"], per_rows, set(range(1, 9))))
    return "".join(parts)


def _own_file(root: Path, folder: Path, name: str) -> bool:
    """Whether a heatmap record's file `name` is a plain file name in its own folder (never a path
    such as '../../../etc/passwd' or '/etc/passwd') and a regular file whose real path lies inside
    the run `root` (never a link to a file elsewhere, such as a private key)."""
    return (Path(name).name == name and name not in (".", "..") and os.sep not in name
            and outside_run(root, folder / name) is None)


def _run_ids(res) -> list[str]:
    """The ids of the run's result records, in order (one pass over results.jsonl, nothing else kept)."""
    try:
        return [str(rec.get("id")) for rec in res]
    except (OSError, ValueError, AttributeError) as e:
        raise MMNError(f"'{res.path}' has no readable results.jsonl ({e}): is it a finished `mmn find` run?") from None


def _heatmaps_on_disk(root: Path, ids: set) -> dict:
    """concept -> heatmap records of DIR/heatmaps that belong to this run: the image id is one of its
    records (a discarded run's folders are not), one record per (id, concept), preferring the folder
    write_heatmaps names for the id. Only folders inside the run whose JSON files are its own count."""
    hdir = root / "heatmaps"
    if not hdir.is_dir() or not inside_run(root, hdir):
        return {}
    own = {}  # folder -> whether it and its JSON files lie inside the run

    def inside(folder: str) -> bool:
        if folder not in own:
            own[folder] = inside_run(root, folder) and all(outside_run(root, p) is None
                                                           for p in Path(folder).glob("*.json"))
        return own[folder]

    recs = [dict(r, id=str(r["id"])) for r in read_heatmaps(hdir)
            if r.get("id") is not None and str(r["id"]) in ids and isinstance(r.get("concept"), str)
            and inside(r["_dir"])]
    recs.sort(key=lambda r: Path(r["_dir"]).name != unique_name(r["id"]))  # stable: the run's own folder first
    out, seen = {}, set()
    for r in recs:
        if (r["id"], r["concept"]) not in seen:
            seen.add((r["id"], r["concept"]))
            out.setdefault(r["concept"], []).append(r)
    return out


def _is_number(v, none: bool = True) -> bool:
    return (none and v is None) or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _metrics_shape(metrics) -> str | None:
    """Why DIR/metrics.json is not shaped as mmn metrics writes it (naming the field), or None."""
    if not isinstance(metrics, dict):
        return "it is not a metrics.json of mmn metrics (a JSON object)"
    for key in ("summary", "concepts", "options", "run"):
        if not isinstance(metrics.get(key, {}), dict):
            return f"its field '{key}' is {type(metrics[key]).__name__}, not an object"
        for k, v in metrics.get(key, {}).items() if key in ("summary", "concepts") else ():
            if not isinstance(v, dict):
                return f"its field '{key}.{k}' is {type(v).__name__}, not an object"
    for k, row in metrics.get("summary", {}).items():
        if not (isinstance(row.get("label"), str) and _is_number(row.get("top")) and _is_number(row.get("random"))):
            return f"its field 'summary.{k}' needs a label and numbers 'top' and 'random'"
    max_images = metrics.get("options", {}).get("max_images")
    if max_images is not None and not (isinstance(max_images, int) and not isinstance(max_images, bool)):
        return "its field 'options.max_images' is not an integer"
    return None


def _stale_metrics(metrics: dict, run: dict, ids: list[str]) -> str | None:
    """Why DIR/metrics.json was not computed on this run's records (another run's file), or None."""
    shape = _metrics_shape(metrics)
    if shape:
        return shape
    rec = metrics.get("run") if isinstance(metrics.get("run"), dict) else {}
    fp, mine = rec.get("weight_fingerprint"), run.get("weight_fingerprint")
    if fp and mine and fp != mine:
        return f"it belongs to a run of other weights ({fp}, this run: {mine})"
    n = metrics.get("records")
    max_images = (metrics.get("options") or {}).get("max_images")
    want = len(ids) if not max_images else min(int(max_images), len(ids))
    if not isinstance(n, int) or n != want:
        return f"it was computed on {n} records, where this run gives {want}"
    sha = rec.get("ids_sha1")
    if sha and sha != ids_digest(ids[:n]):
        return "it was computed on other images than this run's"
    return None


def _in_range(v, size: int | None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (size is None or v < size)


def _read_concepts(root: Path, run: dict, engine) -> dict:
    """DIR/concepts.json, checked: per word an image count and top neurons inside the model (the run's
    sizes, else the engine's); MMNError naming the field otherwise."""
    path = root / "concepts.json"
    try:
        summary = json.loads(run_file(root, path).read_text()) if os.path.lexists(path) else None
    except (OSError, ValueError):
        summary = None
    if summary is None:
        raise MMNError(f"'{root}' has no readable concepts.json: is it a finished `mmn find` run?")
    adapter = run.get("adapter") or {}
    n_layers = adapter.get("n_layers") or (engine.adapter.n_layers if engine else None)
    d_mlp = adapter.get("d_mlp") or (engine.adapter.d_mlp if engine else None)

    def bad(field, want, got):
        raise MMNError(f"'{path}': field '{field}' must be {want}, got {got!r:.80}; {RERUN}")

    if not isinstance(summary, dict):
        bad("(top level)", "an object of concepts", summary)
    span = {"layer": n_layers, "index": d_mlp, "count": None}
    for w, info in summary.items():
        if not (isinstance(info, dict) and _in_range(info.get("images"), None)
                and isinstance(info.get("neurons"), list)):
            bad(w, "an object with images (an integer) and neurons (a list)", info)
        for j, x in enumerate(info["neurons"]):
            if not isinstance(x, dict):
                bad(f"{w}.neurons[{j}]", "an object", x)
            for key, size in span.items():
                if not _in_range(x.get(key), size):
                    bad(f"{w}.neurons[{j}].{key}", f"an integer in 0..{size - 1}" if size else "an integer >= 0",
                        x.get(key))
            if not _is_number(x.get("mean_score"), none=False):
                bad(f"{w}.neurons[{j}].mean_score", "a number", x.get("mean_score"))
    return summary


def _read_metrics(root: Path, run: dict, ids: list[str]) -> tuple[dict | None, str | None]:
    """(DIR/metrics.json, None) when it is the run's own, well-formed file; else (None, why it is not
    shown) when there is one; (None, None) when there is none."""
    path = root / "metrics.json"
    if not os.path.lexists(path):
        return None, None
    metrics, why = None, outside_run(root, path)
    why = why and f"it {why}"
    if not why:
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            why = "it is not valid JSON"
    why = why or _stale_metrics(metrics, run, ids)
    return (None, f"{path} is not shown: {why}. Run mmn metrics again.") if why else (metrics, None)


def _dig(d, path):
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def build_report(results_dir, engine=None, neurons: int = 10, examples: int = 3, k: int = 8,
                 method: str = "activation", max_concepts: int = 30) -> str:
    """The report's HTML text. `engine` (optional) adds top tokens and computed heatmaps; it must be the
    run's model (MMNError on other shapes, a RunModelWarning on other weights)."""
    if not isinstance(neurons, int) or neurons < 1:
        raise MMNError(f"neurons (--neurons) must be at least 1, got {neurons!r}")
    if not isinstance(examples, int) or examples < 0:
        raise MMNError(f"examples (--examples) must be at least 0, got {examples!r}")
    root = Path(results_dir)
    res = open_results(root)
    run = res.run
    model_note = check_run_model(res, engine, "the report's top tokens and heatmaps") if engine is not None else None
    summary = _read_concepts(root, run, engine)
    words = list(summary)[:max_concepts]
    n_layers = (run.get("adapter") or {}).get("n_layers") or (engine.adapter.n_layers if engine else None)
    neuron_lists = {w: [(x["layer"], x["index"]) for x in summary[w]["neurons"][:neurons]] for w in words}
    if not n_layers:
        n_layers = 1 + max((l for ns in neuron_lists.values() for l, _ in ns), default=0)
    per_layer = [0] * n_layers
    for ns in neuron_lists.values():
        for l, _ in ns:
            per_layer[l] += 1
    tokens = _promoted(engine, res, summary, words, neurons, k)
    # The run's ids tell its own heatmaps and metrics from a discarded run's: read only when there are
    # any (one pass over results.jsonl, seconds per GB).
    has_artifacts = (root / "heatmaps").is_dir() or (root / "metrics.json").is_file()
    ids = _run_ids(res) if has_artifacts else []
    on_disk = _heatmaps_on_disk(root, set(ids)) if has_artifacts else {}
    todo = [w for w in words if w not in on_disk]
    computed = _examples(engine, res, todo, examples, neurons, method) if todo else {}
    metrics, metrics_note = _read_metrics(root, run, ids)
    if metrics and metrics.get("weight_fingerprint") and run.get("weight_fingerprint") \
            and metrics["weight_fingerprint"] != run["weight_fingerprint"]:
        metrics_note = (f"computed with the model '{metrics.get('model')}' (weights "
                        f"{metrics['weight_fingerprint']}), not the run's weights ({run['weight_fingerprint']}).")
    totals = run.get("totals") or {}
    opts = run.get("options") or {}
    h = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mmn report: {_e(root.name)}</title>"
         f"<style>{CSS}</style></head><body><main>",
         f"<h1>Multi-modal neurons: {_e(Path(str(run.get('model', '?'))).name)}</h1>",
         f'<p class="muted">{_e(root.resolve())} &middot; report written {_e(time.strftime("%Y-%m-%d %H:%M"))}</p>',
         '<nav><a href="#summary">Summary</a><a href="#layers">Layers</a><a href="#concepts">Concepts</a>'
         + ('<a href="#metrics">Metrics</a>' if metrics or metrics_note else "") + '<a href="#edits">Edits</a></nav>',
         '<h2 id="summary">Run summary</h2><div class="card">']
    if model_note:
        h.insert(-1, f'<p class="muted">Note: {_e(model_note)}</p>')
    facts = [("model", run.get("model")), ("adapter", f"{n_layers} layers x {(run.get('adapter') or {}).get('d_mlp', '?')} MLP neurons"),
             ("images", totals.get("images")), ("skipped", totals.get("skipped")), ("concepts", len(summary)),
             ("neurons scored", f"{totals.get('neurons_scored', 0):,}"), ("seconds", run.get("seconds")),
             ("device / dtype / backend", f"{run.get('device')} / {run.get('dtype')} / {run.get('backend')}"),
             ("corpus", run.get("corpus"))]
    facts += [(f"option {k}", v) for k, v in opts.items() if v is not None]  # unset options say nothing
    h.append(_table(None, [[f"<b>{_e(a)}</b>", _e(b)] for a, b in facts]) + "</div>")
    h.append(f'<h2 id="layers">Where the multi-modal neurons are</h2><p class="muted">Layers of the top-{neurons} '
             f"neurons of the {len(words)} most frequent concepts ({sum(per_layer)} neurons).</p>"
             f'<div class="card">{layer_svg(per_layer, "top neurons per layer")}</div>')
    h.append('<h2 id="concepts">Concepts</h2>')
    if tokens:
        h.append('<p class="muted">activation: the sign of the neuron\'s activation where it was scored for the '
                 'concept (sign(mean score) &times; sign(&lt;W_out[:, i], W_U[t]&gt;)); tokens it promotes: the top of '
                 'W_U W_out[:, i] when +, the bottom (most negative first) when &minus;.</p>')
    if (root / "heatmaps").is_dir() and not inside_run(root, root / "heatmaps"):
        h.append('<p class="muted">heatmaps/ leads outside the run directory: its figures are not embedded '
                 '(move the folder itself into the run).</p>')
    if "_error" in computed:
        h.append(f'<p class="muted">No heatmaps: {_e(computed["_error"])}</p>')
    elif engine is None and todo:
        h.append('<p class="muted">Model not loaded: no top tokens or computed heatmaps (pass --model).</p>')
    for w in words:
        info = summary[w]
        rows = []
        for rank, x in enumerate(info["neurons"][:neurons], 1):
            sign, toks = tokens.get((w, x["layer"], x["index"]), (None, []))
            toks = "".join(f'<span class="tok">{_e(t)}</span>' for t in toks)
            rows.append([rank, x["layer"], x["index"], x["count"], _num(float(x["mean_score"]), 4),
                         "" if sign is None else ("+" if sign > 0 else "&minus;"), toks])
        h.append(f'<h3 id="c-{_e(w)}">{_e(w)} <span class="muted">({info["images"]} images)</span></h3>'
                 + _table(["#", "layer", "neuron", "images in top-k", "mean score", "activation", "tokens it promotes"],
                          rows, {0, 1, 2, 3, 4}))
        figs = []
        for rec in on_disk.get(w, [])[:examples]:
            d = Path(rec["_dir"])
            for key, label in (("heatmap", "heatmap"), ("mask", "mask")):
                name = rec.get(key)
                if isinstance(name, str) and name and _own_file(root, d, name):  # never a file outside the run
                    figs.append(f'<figure><img alt="{_e(label)}" src="{file_uri(d / name)}"><figcaption>{_e(rec["id"])}: '
                                f'{_e(label)} ({_e(rec.get("method"))}, top-{len(rec.get("neurons", []))})</figcaption></figure>')
        for cap, over, masked in computed.get(w, []) if isinstance(computed.get(w), list) else []:
            figs.append(f'<figure><img alt="heatmap" src="{over}"><figcaption>{_e(cap)}: heatmap ({_e(method)})</figcaption></figure>'
                        f'<figure><img alt="mask" src="{masked}"><figcaption>mask (top 5% of pixels)</figcaption></figure>')
        if figs:
            h.append(f'<div class="figs">{"".join(figs)}</div>')
    if metrics or metrics_note:
        note = f'<p class="muted">Note: {_e(metrics_note)}</p>' if metrics_note else ""
        h.append(f'<h2 id="metrics">Property metrics</h2><div class="card">{note}'
                 f'{_metrics_section(metrics) if metrics else ""}</div>')
    blocks = _patches(root)
    h.append('<h2 id="edits">Edits</h2>' + ("".join(blocks) if blocks else '<p class="muted">No patch files in this directory.</p>'))
    h.append("</main></body></html>")
    return "\n".join(h)


def write_report(results_dir, out=None, engine=None, **kw) -> Path:
    """Write the report (default `results_dir/report.html`) atomically; returns its path."""
    if engine is not None:
        engine.adapter.require_dense("mmn report (its neuron pages read [layer, index] neurons)")
    text = build_report(results_dir, engine, **kw)
    path = Path(out) if out else Path(results_dir) / "report.html"
    with atomic_open(path, "w") as f:
        f.write(text)
    return path
