"""Hostile corpora (issue 13): FIFOs and devices where files are expected, oversized tar members,
files and parquet cells, decompression bombs, and a corpus changed under a run that resumes."""
from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import tracemalloc
import warnings

import pytest
from PIL import Image

import mmn_fast
from mmn_fast.cli.main import build_parser, main
from mmn_fast.demo import make_examples, save_examples
from mmn_fast.errors import MMNError
from mmn_fast.model.inputs import MAX_IMAGE_BYTES, load_image
from mmn_fast.model.patch_file import PatchError, load_patch
from mmn_fast.run.corpus import open_corpus
from mmn_fast.run.runner import RunSettings, check_run, run_corpus

FIND = ["--concepts", "all", "--max-new-tokens", "6", "--batch-size", "2", "--top-k", "5", "--num-workers", "0",
        "--quiet"]


# --------------------------------------------------------------------------------------- helpers
@pytest.fixture
def no_hang():
    """What would block on a FIFO fails after 10 s instead of hanging the suite (and again every
    2 s after, should the code under test swallow the first TimeoutError)."""
    def stop(*_):
        raise TimeoutError("blocked (opening a FIFO?)")

    before = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 10, 2)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, before)


def _png(size=(8, 8), noise=False) -> bytes:
    im = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise else Image.new("RGB", size, "red")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _samples(corpus, decode=True):
    return [s for sh in range(corpus.n_shards) for s in corpus.iter_shard(sh, decode=decode)]


class _Zeros(io.RawIOBase):
    """n zero bytes, streamed (a huge tar member is written without holding it)."""

    def __init__(self, n: int):
        self.n = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.n)
        b[:k] = bytes(k)
        self.n -= k
        return k


def _tar(path, members, mode="w", **kw):
    with tarfile.open(path, mode, **kw) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, int):  # that many zero bytes
                info.size = data
                tf.addfile(info, io.BufferedReader(_Zeros(data)))
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


# ------------------------------------------------------------------------- 6: FIFOs and devices
def test_a_fifo_among_the_images_is_skipped_not_waited_for(tmp_path, no_hang):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    os.mkfifo(root / "a.txt")                     # a caption that is a FIFO: no caption
    os.mkfifo(root / "b.png")
    (root / "c.png").write_bytes(_png())
    for decode in (True, False):
        a, b, c = _samples(open_corpus(root), decode)
        assert a.error is None and a.caption is None and c.error is None
        assert "FIFO" in b.error and "not a regular file" in b.error and b.image is None
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": f"imgs/{n}.png"}) + "\n" for n in "abc"))
    a, b, c = _samples(open_corpus(tmp_path / "m.jsonl"))
    assert a.error is None and "FIFO" in b.error and c.error is None


def test_a_corpus_path_that_is_not_a_regular_file_is_one_error(tmp_path, no_hang):
    pytest.importorskip("braceexpand")
    for name in ("m.jsonl", "m.csv", "one.png", "shard.tar", "rows.parquet"):
        os.mkfifo(tmp_path / name)
        with pytest.raises(MMNError, match=r"is a FIFO \(named pipe\), not a regular file"):
            open_corpus(tmp_path / name)
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    with pytest.raises(MMNError, match="is a character device, not a regular file"):
        open_corpus(tmp_path / "zero.jsonl")
    d = tmp_path / "wds"
    d.mkdir()
    _tar(d / "s-0.tar", [("k.png", _png())])
    os.mkfifo(d / "s-1.tar")
    for pattern in ("s-*.tar", "s-{0..1}.tar"):
        with pytest.raises(MMNError, match="s-1.tar' is a FIFO"):
            open_corpus(str(d / pattern))
    assert open_corpus(d).n_shards == 1           # a folder of shards lists regular files only


def test_a_tar_shard_replaced_by_a_fifo_after_opening_is_a_bad_sample(tmp_path, no_hang):
    p = _tar(tmp_path / "s.tar", [("k.png", _png())])
    corpus = open_corpus(p)
    p.unlink()
    os.mkfifo(p)
    (only,) = _samples(corpus)
    assert "cannot open tar shard" in only.error and "FIFO" in only.error


def test_a_manifest_that_is_dev_zero_is_refused_without_reading_it(tmp_path):
    """In a child process with 1.2 GB of address space, so that reading /dev/zero fails fast if it happens."""
    (tmp_path / "m.jsonl").symlink_to("/dev/zero")
    code = ("from mmn_fast.run.corpus import open_corpus\n"
            f"try:\n    open_corpus({str(tmp_path / 'm.jsonl')!r})\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1200 << 20, 1200 << 20))

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, preexec_fn=limit,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and done.stdout.startswith("MMNError") and "character device" in done.stdout, \
        (done.stdout, done.stderr[-1000:])


def test_a_manifest_line_is_read_up_to_a_limit(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_bytes(json.dumps({"image": "a.png"}).encode() + b"\n" + b"x" * (16 << 20))  # no line break
    tracemalloc.start()
    try:
        with pytest.raises(MMNError, match=r"m.jsonl:2: line longer than 1,048,576 bytes"):
            open_corpus(m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (4 << 20)                        # the line was not read whole (16 MiB)


def test_load_image_refuses_fifos_devices_and_folders(tmp_path, no_hang):
    os.mkfifo(tmp_path / "f.png")
    (tmp_path / "d.png").mkdir()
    for path, what in ((tmp_path / "f.png", r"a FIFO \(named pipe\)"), ("/dev/zero", "a character device"),
                       (tmp_path / "d.png", "a directory")):
        with pytest.raises(MMNError, match=f"is {what}, not a regular file"):
            load_image(str(path))
    with pytest.raises(MMNError, match="not found"):
        load_image(str(tmp_path / "missing.png"))


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_a_patch_path_that_is_not_a_regular_file_says_what_it_is(tmp_path, kind, no_hang):
    path = tmp_path / "p.mmnpatch.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    what = {"fifo": "a FIFO", "dev_zero": "a character device", "directory": "a directory"}[kind]
    with pytest.raises(PatchError, match=f"is {what}.*, not a regular file"):
        load_patch(path)


# ------------------------------------------------------------------ 7: bytes and pixels per image
@pytest.mark.parametrize("suffix", ["tar", "tar.gz", "tar.bz2", "tar.xz"])
def test_a_tar_member_over_the_limit_is_drained_not_held(tmp_path, suffix):
    """64 MiB of zeros (in a few dozen bytes of bzip2) with a 64 KiB limit: skipped, the next member
    read, and never more than a read buffer in memory, compressed or not."""
    mode = "w" if suffix == "tar" else "w:" + suffix.split(".")[1]
    p = _tar(tmp_path / f"s.{suffix}", [("a.png", _png()), ("b.png", 64 << 20), ("b.txt", b"cap"), ("c.png", _png())],
             mode=mode)
    corpus = open_corpus(p, max_image_bytes=64 << 10)
    tracemalloc.start()
    try:
        a, b, c = _samples(corpus)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert a.error is None and c.error is None
    assert "b.png is 67,108,864 bytes, over the limit of 65,536 bytes" in b.error and "--max-image-bytes" in b.error
    assert peak < (16 << 20)  # the member is 64 MiB (xz keeps an 8 MiB dictionary)


def test_a_huge_pax_header_is_not_read_into_memory(tmp_path):
    p = _tar(tmp_path / "s.tar", [("a.png", _png())], format=tarfile.PAX_FORMAT,
             pax_headers={"comment": "x" * (2 << 20)})
    (only,) = _samples(open_corpus(p))
    assert "extended header of" in only.error and only.image is None


def test_files_and_parquet_cells_over_the_limit_are_skipped(tmp_path):
    small, big = _png(), _png((64, 64), noise=True)
    assert len(small) < 4096 < len(big)
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "big.png").write_bytes(big)
    (root / "small.png").write_bytes(small)
    b, s = _samples(open_corpus(root, max_image_bytes=4096))
    assert "file too large" in b.error and f"{len(big):,} bytes, over the limit of 4,096" in b.error
    assert s.error is None
    with pytest.raises(MMNError, match="positive number of bytes"):
        open_corpus(root, max_image_bytes=0)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [big, small], "caption": ["b", "s"]}), tmp_path / "rows.parquet")
    b, s = _samples(open_corpus(tmp_path / "rows.parquet", max_image_bytes=4096))
    assert "image too large" in b.error and "--max-image-bytes" in b.error and s.error is None


def test_a_decompression_bomb_is_a_skip_reason_not_a_warning(tmp_path, monkeypatch):
    """Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: both are one skip reason."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64 x 64 = 4096: the warning band
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "bomb.png").write_bytes(_png((64, 64)))
    (root / "fine.png").write_bytes(_png())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        bomb, fine = _samples(open_corpus(root))
        with pytest.raises(MMNError, match="too many pixels"):
            load_image(str(root / "bomb.png"))
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "too many pixels" in bomb.error and "\n" not in bomb.error and fine.error is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # past twice the limit: Pillow's own error
    bomb, _ = _samples(open_corpus(root))
    assert "too many pixels" in bomb.error


def test_find_has_a_max_image_bytes_option(tmp_path):
    args = build_parser().parse_args(["find", "--model", "m", "--images", "i", "--out", "o"])
    assert args.max_image_bytes == MAX_IMAGE_BYTES == 64 << 20
    args = build_parser().parse_args(["find", "--model", "m", "--images", "i", "--out", "o",
                                      "--max-image-bytes", "1000"])
    assert args.max_image_bytes == 1000
    save_examples(make_examples(1, seed=3), tmp_path / "imgs")
    with pytest.raises(MMNError, match="--max-image-bytes must be a positive number of bytes"):
        check_run(tmp_path / "imgs", tmp_path / "out", RunSettings(max_image_bytes=0), mmn_fast.FindOptions())


def test_a_run_skips_images_over_its_limit_and_records_it(demo, tmp_path):
    root = tmp_path / "imgs"
    save_examples(make_examples(3, seed=31), root)
    (root / "noise.png").write_bytes(_png((96, 96), noise=True))
    cap = max(p.stat().st_size for p in root.glob("shape_*.png")) + 1
    assert (root / "noise.png").stat().st_size > cap
    opts = mmn_fast.FindOptions(concepts="all", max_new_tokens=6, batch_size=2, top_k=5)
    out = tmp_path / "out"
    summary = run_corpus(demo, root, out, RunSettings(progress=False, max_image_bytes=cap), opts)
    assert (summary["images"], summary["skipped"]) == (3, 1)
    (skip,) = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skip["key"] == "noise" and "--max-image-bytes" in skip["reason"]
    assert json.loads((out / "run.json").read_text())["max_image_bytes"] == cap
    with pytest.raises(MMNError, match=r"different settings \(max_image_bytes\)"):
        run_corpus(demo, root, out, RunSettings(progress=False), opts)


# ----------------------------------------------------------------------- 5: the corpus' identity
def _fp(spec, **kw):
    return open_corpus(spec, **kw).fingerprint()


def test_the_fingerprint_sees_renames_additions_sizes_and_mtimes(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    save_examples(make_examples(4, seed=5), root)
    (root / "manifest.jsonl").unlink()
    (root / "shape_0001.txt").write_text("a caption")
    fp = _fp(root, shard_size=2)
    assert fp["version"] == 1 and len(fp["shards"]) == 2 and len(fp["digest"]) == 64
    monkeypatch.chdir(tmp_path)
    assert _fp("./imgs/", shard_size=2) == fp                     # the same files, however named
    os.rename(root / "shape_0003.png", root / "shape_0009.png")    # same count, one renamed
    renamed = _fp(root, shard_size=2)
    assert renamed["digest"] != fp["digest"] and renamed["shards"][0] == fp["shards"][0]
    st = (root / "shape_0000.png").stat()
    os.utime(root / "shape_0000.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))   # touched
    touched = _fp(root, shard_size=2)
    assert touched["shards"][0] != renamed["shards"][0] and touched["shards"][1] == renamed["shards"][1]
    (root / "shape_0001.txt").write_text("another caption!")      # a caption rewritten
    assert _fp(root, shard_size=2)["shards"][0] != touched["shards"][0]


def test_the_fingerprint_of_each_kind(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = save_examples(make_examples(3, seed=6), tmp_path / "m")
    tar = _tar(tmp_path / "s.tar", [("k.png", _png())])
    pq.write_table(pa.table({"image": [_png()]}), tmp_path / "rows.parquet")
    one = tmp_path / "m" / "shape_0000.png"
    specs = (manifest, tar, tmp_path / "rows.parquet", one)
    before = [_fp(s) for s in specs]
    assert [_fp(s) for s in specs] == before                      # stable
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], lines[1].replace('"caption": "', '"caption": "x'), lines[2]]) + "\n")
    for p in (tar, tmp_path / "rows.parquet", one):
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    after = [_fp(s) for s in specs]
    assert all(a["digest"] != b["digest"] for a, b in zip(after, before))
    st = (tmp_path / "m" / "shape_0002.png").stat()                # a manifest's image rewritten
    os.utime(tmp_path / "m" / "shape_0002.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert _fp(manifest)["digest"] != after[0]["digest"]


def test_resuming_after_the_corpus_changed_is_refused(demo_path, tmp_path, capsys):
    """One image renamed, the count unchanged: refused with what changed, not resumed into stale results."""
    root = tmp_path / "imgs"
    save_examples(make_examples(4, seed=32), root)
    (root / "manifest.jsonl").unlink()
    out = tmp_path / "out"
    run = ["find", "--model", str(demo_path), "--images", str(root), "--out", str(out), *FIND, "--shard-size", "2"]
    assert main(run) == 0
    assert main(run) == 0                                          # unchanged: a no-op rerun
    capsys.readouterr()
    os.rename(root / "shape_0003.png", root / "shape_0009.png")
    assert main(run) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mmn: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "changed since the run" in lines[0] and "shard(s) 1 of 2" in lines[0] and "--overwrite" in lines[0]
    assert main([*run, "--overwrite"]) == 0
    ids = [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert ids == ["shape_0000", "shape_0001", "shape_0002", "shape_0009"]


def test_runs_recorded_before_corpus_fingerprints(demo, tmp_path):
    """Such a run resumes, with a warning that the corpus cannot be checked; another fingerprint
    version is refused by name."""
    manifest = save_examples(make_examples(3, seed=33), tmp_path / "imgs")
    opts = mmn_fast.FindOptions(concepts="all", max_new_tokens=6, batch_size=2, top_k=5)
    settings = RunSettings(progress=False)
    out = tmp_path / "out"
    run_corpus(demo, manifest, out, settings, opts)
    cfg_path = out / "parts" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["corpus_fingerprint"]["version"] == 1
    old = {k: v for k, v in cfg.items() if k != "corpus_fingerprint"}
    cfg_path.write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="did not record the corpus' files"):
        assert run_corpus(demo, manifest, out, settings, opts)["images"] == 3
    cfg_path.write_text(json.dumps(dict(cfg, corpus_fingerprint=dict(cfg["corpus_fingerprint"], version=99))))
    with pytest.raises(MMNError, match="fingerprint version 99"):
        run_corpus(demo, manifest, out, settings, opts)
