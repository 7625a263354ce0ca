"""Corpus readers: every format, captions, keys, shards, resumption, bad samples, DataLoader workers."""
from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tarfile
from collections import Counter, defaultdict

import pytest
from PIL import Image

from mmn_fast.run.corpus import Corpus, Sample, WebDatasetCorpus, iter_samples, open_corpus
from mmn_fast.errors import MMNError


# --------------------------------------------------------------------------------------- helpers
def _img_bytes(color=(255, 0, 0), fmt="PNG", size=(8, 8), noise=False) -> bytes:
    im = Image.new("RGB", size, color)
    if noise:
        im = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _all(corpus: Corpus, decode: bool = True) -> list[Sample]:
    return [s for sh in range(corpus.n_shards) for s in corpus.iter_shard(sh, decode=decode)]


def _assert_resumable(corpus: Corpus):
    """iter_shard(start=k) is the tail of iter_shard(0), for every k (and past the end)."""
    for sh in range(corpus.n_shards):
        full = [(s.position, s.key, s.caption, s.error, s.image is None) for s in corpus.iter_shard(sh)]
        assert [s[0] for s in full] == list(range(len(full)))
        for k in range(len(full) + 2):
            tail = [(s.position, s.key, s.caption, s.error, s.image is None) for s in corpus.iter_shard(sh, start=k)]
            assert tail == full[k:]


def _check_good(s: Sample):
    assert s.error is None and s.image is not None
    assert s.image.mode == "RGB" and s.image.size == (8, 8)


# ---------------------------------------------------------------------------------------- folder
def test_folder_recursive_sorted_captions_and_bad_files(tmp_path):
    root = tmp_path / "imgs"
    _write(root / "b.png", _img_bytes())
    _write(root / "b.txt", "  a red square \n")
    _write(root / "a.jpg", _img_bytes((0, 255, 0), "JPEG"))
    _write(root / "sub" / "c.webp", _img_bytes((0, 0, 255), "WEBP"))
    _write(root / "sub" / "d.png", b"not an image at all")       # corrupt
    _write(root / "sub" / "e.gif", _img_bytes(fmt="GIF"))
    _write(root / "notes.md", "ignored")
    _write(root / ".hidden.png", _img_bytes())                      # ignored
    c = open_corpus(root, shard_size=2)
    assert c.kind == "folder" and c.spec == str(root)
    assert c.n_shards == 3 and [c.shard_size(i) for i in range(3)] == [2, 2, 1] and c.size() == 5
    samples = _all(c)
    assert [s.key for s in samples] == ["a", "b", "sub/c", "sub/d", "sub/e"]
    assert [(s.shard, s.position) for s in samples] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert samples[1].caption == "a red square" and samples[0].caption is None
    for i in (0, 1, 2, 4):
        _check_good(samples[i])
    assert samples[3].image is None and "cannot decode image" in samples[3].error
    assert samples[3].source == str(root / "sub" / "d.png")
    assert samples[0].image.getpixel((0, 0))[1] > 200                 # green JPEG, decoded
    _assert_resumable(c)
    assert all(s.image is None and s.error is None for s in c.iter_shard(0, decode=False))


def test_folder_same_stem_keys_stay_unique(tmp_path):
    _write(tmp_path / "x.png", _img_bytes())
    _write(tmp_path / "x.jpg", _img_bytes(fmt="JPEG"))
    _write(tmp_path / "y.png", _img_bytes())
    keys = [s.key for s in _all(open_corpus(tmp_path), decode=False)]
    assert keys == ["x.jpg", "x.png", "y"]


def test_bad_specs_raise(tmp_path):
    with pytest.raises(MMNError, match="no images"):
        open_corpus(_write(tmp_path / "empty" / "readme.txt", "x").parent)
    with pytest.raises(MMNError, match="does not exist"):
        open_corpus(tmp_path / "nope")
    with pytest.raises(MMNError, match="not a corpus"):
        open_corpus(_write(tmp_path / "model.bin", b"x"))
    with pytest.raises(MMNError, match="no files match"):
        open_corpus(str(tmp_path / "*.tar"))
    with pytest.raises(MMNError, match="shard_size"):
        open_corpus(tmp_path, shard_size=0)


def test_identity_is_the_absolute_spec_however_typed(tmp_path, monkeypatch):
    pytest.importorskip("braceexpand")
    _write(tmp_path / "data" / "a.png", _img_bytes())
    _write(tmp_path / "data" / "m.jsonl", json.dumps({"image": "a.png"}) + "\n")
    _tar(tmp_path / "data" / "s-0.tar", [("0.png", _img_bytes())])
    monkeypatch.chdir(tmp_path)
    m = str(tmp_path / "data" / "m.jsonl")
    assert open_corpus("data/m.jsonl").identity == open_corpus("./data/m.jsonl").identity == m
    assert open_corpus("data/").identity == open_corpus("data").identity == str(tmp_path / "data")
    assert open_corpus("./data/../data/s-{0..0}.tar").identity == str(tmp_path / "data" / "s-{0..0}.tar")
    assert open_corpus("data/m.jsonl").spec == "data/m.jsonl"                      # as typed, for messages
    monkeypatch.chdir(_write(tmp_path / "other" / "data" / "m.jsonl", json.dumps({"image": "a.png"})).parent.parent)
    assert open_corpus("data/m.jsonl").identity == str(tmp_path / "other" / "data" / "m.jsonl")  # another corpus


def test_identity_follows_symlinks_and_takes_the_working_directory_literally(tmp_path, monkeypatch):
    """'link/../data' is where the OS goes (the link's target's parent), not the text's 'data'; a
    working directory named 'proj[v2]' is no glob pattern."""
    real = tmp_path / "real" / "sub"
    _write(real.parent / "data" / "m.jsonl", json.dumps({"image": "a.png"}) + "\n")
    _write(tmp_path / "data" / "m.jsonl", json.dumps({"image": "b.png"}) + "\n")  # another corpus
    real.mkdir(parents=True)
    os.symlink(real, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    assert open_corpus("link/../data/m.jsonl").identity == os.path.realpath(real.parent / "data" / "m.jsonl")
    assert open_corpus("link/../data/m.jsonl").identity != open_corpus("data/m.jsonl").identity
    proj = tmp_path / "proj[v2]"
    _write(proj / "data" / "m.jsonl", json.dumps({"image": "a.png"}) + "\n")
    monkeypatch.chdir(proj)
    assert open_corpus("data/m.jsonl").identity == open_corpus("./data/m.jsonl").identity


def test_single_image(tmp_path):
    p = _write(tmp_path / "cat.png", _img_bytes())
    _write(tmp_path / "cat.txt", "a cat")
    c = open_corpus(p)
    assert (c.kind, c.n_shards, c.shard_size(0), c.size()) == ("image", 1, 1, 1)
    (s,) = _all(c)
    _check_good(s)
    assert (s.key, s.caption, s.source) == ("cat", "a cat", str(p))
    assert list(c.iter_shard(0, start=1)) == []


# -------------------------------------------------------------------------------------- manifests
def test_jsonl_manifest(tmp_path):
    _write(tmp_path / "imgs" / "a.png", _img_bytes())
    absolute = _write(tmp_path / "elsewhere" / "b.jpg", _img_bytes(fmt="JPEG"))
    _write(tmp_path / "imgs" / "bad.jpg", b"\xff\xd8\xff garbage")
    _write(tmp_path / "imgs" / "pic.avif", b"\x00\x00\x00\x1cftypavif")
    lines = [
        {"image": "imgs/a.png", "caption": "first"},
        {"image": str(absolute), "id": "B"},
        {"image": "imgs/missing.png"},
        {"image": "imgs/pic.avif"},
        {"image": "imgs/bad.jpg"},
        {"image": "imgs/a.png", "caption": "again"},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:3]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[3:]) + "\n"
    m = _write(tmp_path / "m.jsonl", text)
    c = open_corpus(m, shard_size=4)
    assert (c.kind, c.n_shards, c.shard_size(0), c.shard_size(1), c.size()) == ("manifest", 2, 4, 2, 6)
    s = _all(c)
    assert [x.key for x in s] == ["imgs/a.png", "B", "imgs/missing.png", "imgs/pic.avif", "imgs/bad.jpg", "imgs/a.png#2"]
    _check_good(s[0]); _check_good(s[1]); _check_good(s[5])  # noqa: E702
    assert s[0].caption == "first" and s[5].caption == "again"
    assert "missing file" in s[2].error and s[2].image is None
    assert "unsupported image type" in s[3].error
    assert "cannot decode image" in s[4].error
    assert [(x.shard, x.position) for x in s] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    _assert_resumable(c)


def test_csv_manifest(tmp_path):
    for n in range(5):
        _write(tmp_path / f"{n}.png", _img_bytes((n * 40, 0, 0)))
    text = ('\ufeffid,image,caption\n'
            'k0,0.png,"plain"\n'
            'k1,1.png,"two\nlines, with comma"\n'
            '\n'
            'k2,2.png,\n'
            'k3,3.png,"x ""quoted"""\n'
            'k4,4.png,last\n')
    c = open_corpus(_write(tmp_path / "m.csv", text), shard_size=2)
    assert c.kind == "manifest" and [c.shard_size(i) for i in range(c.n_shards)] == [2, 2, 1]
    s = _all(c)
    assert [x.key for x in s] == ["k0", "k1", "k2", "k3", "k4"]
    assert [x.caption for x in s] == ["plain", "two\nlines, with comma", None, 'x "quoted"', "last"]
    for x in s:
        _check_good(x)
    _assert_resumable(c)


@pytest.mark.parametrize("name,text,where", [
    ("m.jsonl", '{"image": "a.png"}\n{"image": "b.png"\n', "m.jsonl:2"),
    ("m.jsonl", '{"image": "a.png"}\n\n["a.png"]\n', "m.jsonl:3"),
    ("m.jsonl", '{"image": "a.png", "id": "x"}\n{"image": "b.png", "id": "x"}\n', "m.jsonl:2"),
    ("m.csv", "image,caption\na.png,x\nb.png,y,extra\n", "m.csv:3"),
    ("m.csv", "path,caption\na.png,x\n", "m.csv:1"),
])
def test_malformed_manifest_line_names_file_and_line(tmp_path, name, text, where):
    with pytest.raises(MMNError, match=where):
        open_corpus(_write(tmp_path / name, text))


# ------------------------------------------------------------------------------------ webdataset
def test_webdataset_shard(tmp_path):
    p = _tar(tmp_path / "shard-00000.tar", [
        ("000.jpg", _img_bytes(fmt="JPEG")), ("000.txt", b"caption zero"),
        ("001.png", _img_bytes()), ("001.json", json.dumps({"caption": "caption one", "url": "u"}).encode()),
        ("002.txt", b"no image here"), ("002.json", b"{}"),
        ("003.avif", b"\x00\x00\x00\x1cftypavif"), ("003.txt", b"unsupported"),
        ("004.jpg", b"\xff\xd8\xffcorrupt"),
        ("sub/005.webp", _img_bytes(fmt="WEBP")), ("sub/005.json", b'{"text": "caption five"}'),
        ("006.seg.png", _img_bytes()), ("006.jpg", _img_bytes(fmt="JPEG")),
    ])
    c = open_corpus(p)
    assert (c.kind, c.n_shards, c.shard_size(0), c.size(), c.shard_name(0)) == ("webdataset", 1, None, None, str(p))
    s = _all(c)
    assert [x.key for x in s] == ["000", "001", "002", "003", "004", "sub/005", "006"]
    assert [x.position for x in s] == list(range(7))
    assert [x.caption for x in s] == ["caption zero", "caption one", "no image here", "unsupported", None,
                                      "caption five", None]
    for i in (0, 1, 5, 6):
        _check_good(s[i])
    assert s[2].error == "no image member" and s[2].image is None
    assert "unsupported image type" in s[3].error
    assert "cannot decode image" in s[4].error
    assert s[0].source == f"{p}:000"
    _assert_resumable(c)


def _big_tar(path, n=4):
    members = []
    for i in range(n):
        members += [(f"k{i}.png", _img_bytes(size=(64, 64), noise=True)), (f"k{i}.txt", f"cap {i}".encode())]
    _tar(path, members)
    return members


def test_truncated_tar_mid_member(tmp_path):
    p = tmp_path / "t.tar"
    _big_tar(p)
    with tarfile.open(p) as tf:
        m = tf.getmember("k2.png")
    data = p.read_bytes()
    p.write_bytes(data[: m.offset_data + m.size // 2])              # cut in the middle of k2.png
    c = open_corpus(p)
    s = _all(c)
    assert [x.key for x in s] == ["k0", "k1", "k2"]
    assert s[0].error is None and s[1].error is None and s[1].caption == "cap 1"
    assert s[0].image.size == (64, 64)
    assert s[2].error.startswith("truncated tar shard") and s[2].image is None
    _assert_resumable(c)
    assert [x.key for x in c.iter_shard(0, start=2, decode=False)] == ["k2"]


def test_truncated_tar_in_header_and_garbage(tmp_path):
    p = tmp_path / "t.tar"
    _big_tar(p)
    with tarfile.open(p) as tf:
        m = tf.getmember("k3.png")
    data = p.read_bytes()
    p.write_bytes(data[: m.offset + 100])                           # cut inside k3.png's header
    s = _all(open_corpus(p))
    assert [x.error is None for x in s] == [True, True, True, False]
    assert s[-1].error.startswith("truncated tar shard") and s[-1].position == 3
    p.write_bytes(data[: m.offset])                                 # cut between members: no end marker
    s = _all(open_corpus(p))
    assert [x.error is None for x in s] == [True, True, True, False]
    p.write_bytes(b"\x01" * 300)                                     # not a tar at all
    (only,) = _all(open_corpus(p))
    assert only.error.startswith("truncated tar shard") and only.position == 0


def test_brace_glob_and_directory_of_tars(tmp_path, monkeypatch):
    pytest.importorskip("braceexpand")
    d = tmp_path / "wds"
    d.mkdir()
    for n in range(3):
        _tar(d / f"shards-{n:05d}.tar", [(f"{n}{i}.png", _img_bytes()) for i in range(2)])
    (d / "00000_stats.json").write_text("{}")                       # img2dataset writes these beside
    pattern = str(d / "shards-{00000..00002}.tar")
    c = open_corpus(pattern)
    assert c.kind == "webdataset" and c.n_shards == 3
    assert [c.shard_name(i) for i in range(3)] == [str(d / f"shards-{n:05d}.tar") for n in range(3)]
    # several shards: keys carry the shard's name, so that they are unique across the corpus
    assert [x.key for x in _all(c)] == [f"shards-{n:05d}/{n}{i}" for n in range(3) for i in range(2)]
    rev = open_corpus(str(d / "shards-{00002,00000}.tar"))
    assert [rev.shard_name(i) for i in range(2)] == [str(d / "shards-00002.tar"), str(d / "shards-00000.tar")]
    assert open_corpus(str(d / "*.tar")).n_shards == 3
    assert open_corpus(d).kind == "webdataset" and open_corpus(d).n_shards == 3
    with pytest.raises(MMNError, match="do not exist"):
        open_corpus(str(d / "shards-{00000..00005}.tar"))
    monkeypatch.setitem(sys.modules, "braceexpand", None)
    with pytest.raises(MMNError, match=r"pip install 'mmn_fast\[data\]'"):
        open_corpus(pattern)


def test_webdataset_keys_are_unique_across_shards(tmp_path):
    """Two shards may use the same member names (two img2dataset runs, say): every key of the corpus
    stays unique, and the same whatever process or restart reads a shard."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _tar(tmp_path / sub / "shard-00000.tar", [("000.png", _img_bytes()), ("000.txt", sub.encode()),
                                                  ("001.png", _img_bytes())])
    c = open_corpus(str(tmp_path / "*" / "shard-00000.tar"))
    s = _all(c)
    assert [x.key for x in s] == ["a/shard-00000/000", "a/shard-00000/001", "b/shard-00000/000", "b/shard-00000/001"]
    assert [x.caption for x in s] == ["a", None, "b", None]
    assert s[2].source == f"{tmp_path / 'b' / 'shard-00000.tar'}:000"
    _assert_resumable(c)
    one = str(tmp_path / "a" / "shard-00000.tar")
    assert [x.key for x in _all(WebDatasetCorpus(one, [one, one]))] == [   # the same shard listed twice
        "shard-00000/000", "shard-00000/001", "shard-00000#2/000", "shard-00000#2/001"]
    assert [x.key for x in _all(open_corpus(one))] == ["000", "001"]     # a single shard: the member keys


# --------------------------------------------------------------------------------------- parquet
def test_parquet_raw_and_struct_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    d = tmp_path / "pq"
    d.mkdir()
    raw = [_img_bytes((i * 30, 0, 0)) for i in range(7)]
    raw[3] = None
    raw[5] = b"garbage"
    pq.write_table(pa.table({"jpg": pa.array(raw, pa.binary()), "caption": [f"c{i}" for i in range(7)]}),
                   d / "a.parquet", row_group_size=3)
    structs = [{"bytes": _img_bytes(fmt="JPEG"), "path": None} for _ in range(3)]
    pq.write_table(pa.table({"image": structs, "id": ["x", "y", "z"], "text": ["t0", None, "t2"]}), d / "b.parquet")
    c = open_corpus(d, shard_size=4)
    assert c.kind == "parquet"
    assert [c.shard_size(i) for i in range(c.n_shards)] == [4, 3, 3] and c.size() == 10
    assert c.shard_name(1) == f"{d / 'a.parquet'}[4:7]"
    s = _all(c)
    assert [x.key for x in s] == [f"a-{i}" for i in range(7)] + ["x", "y", "z"]
    assert [(x.shard, x.position) for x in s] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2),
                                                  (2, 0), (2, 1), (2, 2)]
    assert [x.caption for x in s] == [f"c{i}" for i in range(7)] + ["t0", None, "t2"]
    assert s[3].error == "no image bytes" and "cannot decode image" in s[5].error
    for i in (0, 1, 2, 4, 6, 7, 8, 9):
        _check_good(s[i])
    assert s[1].source == f"{d / 'a.parquet'}#1"
    _assert_resumable(c)
    assert open_corpus(d / "b.parquet").n_shards == 1
    pq.write_table(pa.table({"url": ["u"]}), tmp_path / "bad.parquet")
    with pytest.raises(MMNError, match="no image column"):
        open_corpus(tmp_path / "bad.parquet")


def test_parquet_keys_are_unique_across_files_and_id_columns(tmp_path):
    """Hugging Face's layout (default/train/0000.parquet, default/validation/0000.parquet) gave both
    files the fallback keys '0000-<row>': fallback keys now come from the path relative to the
    files' common folder, and are the same on every read."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "default"
    for split in ("train", "validation"):
        (root / split).mkdir(parents=True)
        pq.write_table(pa.table({"image": [{"bytes": _img_bytes(), "path": None}] * 2}), root / split / "0000.parquet")
    c = open_corpus(str(root / "*" / "0000.parquet"), shard_size=1)
    assert [x.key for x in _all(c, decode=False)] == ["train/0000-0", "train/0000-1", "validation/0000-0",
                                                      "validation/0000-1"]
    _assert_resumable(c)

    d = tmp_path / "ids"
    d.mkdir()
    pq.write_table(pa.table({"jpg": [_img_bytes()] * 4, "key": ["k1", "k2", "k3", None]}),
                   d / "d.parquet", row_group_size=3)
    pq.write_table(pa.table({"jpg": [_img_bytes()] * 2}), d / "e.parquet")   # no id column: 'e-0', 'e-1'
    c = open_corpus(d, shard_size=2)
    keys = [x.key for x in _all(c)]
    assert keys == ["k1", "k2", "k3", "d-3", "e-0", "e-1"]  # ids as given, fallbacks where null
    _assert_resumable(c)
    twice = open_corpus(f"{d}/{{d,d}}.parquet", shard_size=2)  # one file listed twice: its own second name
    assert [x.key for x in _all(twice, decode=False)] == ["k1", "k2", "k3", "d-3", "k1", "k2", "k3", "d#2-3"]
    again = pickle.loads(pickle.dumps(c))          # what a DataLoader worker reads
    assert [x.key for x in _all(again, decode=False)] == keys


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MMNError, match=r"pip install 'mmn_fast\[data\]'"):
        open_corpus(_write(tmp_path / "x.parquet", b"PAR1"))


# ------------------------------------------------------------------------------------ DataLoader
def test_iter_samples_workers_same_samples_in_shard_order(tmp_path):
    for n in range(3):
        members = [(f"{n}-{i}.png", _img_bytes()) for i in range(3)]
        if n == 1:
            members.insert(1, ("1-x.txt", b"no image"))
        _tar(tmp_path / f"{n}.tar", members)
    c = open_corpus(str(tmp_path / "*.tar"))
    pickle.loads(pickle.dumps(c))
    starts = {2: 1}

    def run(workers):
        out = list(iter_samples(c, [0, 1, 2], starts=starts, num_workers=workers))
        for s in out:
            assert isinstance(s, Sample) and (s.image is None) == (s.error is not None)
        return out

    serial, parallel = run(0), run(2)
    assert [(s.shard, s.position) for s in serial] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3),
                                                       (2, 1), (2, 2)]
    assert Counter((s.shard, s.position, s.key) for s in serial) == Counter(
        (s.shard, s.position, s.key) for s in parallel)
    per_shard = defaultdict(list)
    for s in parallel:
        per_shard[s.shard].append(s.position)
    assert all(v == sorted(v) for v in per_shard.values())
    assert [s.error for s in parallel if s.error] == ["no image member"]
    again = pickle.loads(pickle.dumps(parallel[0]))
    assert again.key == parallel[0].key and again.image.tobytes() == parallel[0].image.tobytes()
    assert list(iter_samples(c, [])) == []


def test_manifest_paths_with_dotdot_behind_a_symlinked_folder(tmp_path, monkeypatch):
    """'../imgs/a.png' in a manifest reached through a symlinked folder is opened where the OS
    finds it (the link target's sibling), and recorded as an absolute path."""
    real = tmp_path / "real"
    _write(real / "imgs" / "a.png", _img_bytes())
    _write(real / "data" / "m.jsonl", json.dumps({"image": "../imgs/a.png"}) + "\n")
    os.symlink(real / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    (s,) = _all(open_corpus("data/m.jsonl"))
    assert s.error is None and os.path.isabs(s.source)
