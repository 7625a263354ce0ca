"""The run folder (`mmn find --out DIR`): what a run writes there, what --overwrite removes, and the
checks that keep a run inside it and away from files it did not write."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import MMNError

RUN_FORMAT_VERSION = 2  # run.json's format_version
# What a finished run leaves in DIR besides parts/: --overwrite removes these (and only these).
RUN_FILES = ("results.jsonl", "skipped.jsonl", "concepts.json", "run.json", "aggregates.json",
             "aggregates.safetensors", "metrics.json", "report.html")
RUN_DIRS = ("heatmaps",)


def run_dir(out_dir: str | os.PathLike, create: bool) -> Path:
    """--out as a Path; an MMNError, not an OSError, when it (or a folder above it) is a file."""
    out = Path(out_dir)
    bad = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if bad is not None:
        where = "is a file" if bad == out else f"is under '{bad}', which is a file"
        raise MMNError(f"--out must be a directory: '{out}' {where}")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # made a file meanwhile
            raise MMNError(f"--out must be a directory: '{out}' is a file or is under one") from None
    return out


def finished_without_parts(out: Path) -> str | None:
    """Why a new run cannot start in `out` (no parts/config.json there): it holds a finished run, or
    files of a run's names that no run here wrote; else None."""
    if not (out / "run.json").is_file():
        theirs = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
        if theirs:
            return (f"'{out}' is not a find run but holds {', '.join(theirs)}, which a run would replace: choose "
                    "another --out, or add --overwrite to replace them")
        return None
    try:
        version = json.loads((out / "run.json").read_text()).get("format_version")
    except (OSError, ValueError, AttributeError):
        version = None
    if version == RUN_FORMAT_VERSION:
        return (f"'{out}' holds a finished run without parts/ (nothing to resume); use --overwrite or "
                "another --out")
    return (f"'{out}' holds a finished run from an older layout (run.json format_version {version!r}); use "
            "--overwrite or another --out")


def remove_run(out: Path) -> None:
    """--overwrite: the previous run's parts/ and the files it wrote (known names only), and only
    when the folder holds a run: a heatmaps/ or report.html of the user's own stays."""
    if not ((out / "parts" / "config.json").is_file() or (out / "run.json").is_file()):
        return
    if (out / "parts").is_symlink():  # rmtree refuses a link: remove the link, never its target
        (out / "parts").unlink()
    shutil.rmtree(out / "parts", ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


def check_own_folders(out: Path, heatmaps: str | None) -> None:
    """DIR/parts (and, when maps are written, DIR/heatmaps and its per-image folders) must be folders
    inside the run, not links to folders elsewhere: a run never writes outside its directory."""
    folders = [out / "parts"]
    if heatmaps and (out / "heatmaps").is_dir() and not (out / "heatmaps").is_symlink():
        with os.scandir(out / "heatmaps") as entries:  # one per image: the links among them only
            folders += [Path(e.path) for e in entries if e.is_symlink()]
    for path in folders + ([out / "heatmaps"] if heatmaps else []):
        if os.path.lexists(path) and (path.is_symlink() or not path.is_dir()):
            real = os.path.realpath(path)
            what = f"a link to '{real}'" if path.is_symlink() else "not a folder"
            raise MMNError(f"'{path}' is {what}: a run writes only inside its directory; remove it, or rerun with "
                           "--overwrite to start again")
