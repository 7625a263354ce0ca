"""Baking hostile input (issue 13): crafted shard names and symlinks in a checkpoint, patches whose
entries name another tensor or layer than apply would patch, an output folder inside the model,
another model shape, and temporary folders left by interrupted bakes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mmn_fast
from mmn_fast.cli.main import main
from mmn_fast.edit.bake import bake
from mmn_fast.edit.methods import perturb
from mmn_fast.errors import MMNError
from mmn_fast.model.live import check_patch
from mmn_fast.model.patch_file import Entry, Patch, PatchError, gather_rows, hashes_by_dtype
from mmn_fast.testing import tiny_llava

KEY = "language_model.model.layers.{}.{}.weight"  # the tiny LLaVA's checkpoint keys
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eng(llava_path):
    """A private engine: apply(force=True) writes into its weights (always reverted)."""
    return mmn_fast.load(llava_path, device="cpu")


@pytest.fixture
def model(llava_path, tmp_path):
    """A copy of the tiny LLaVA checkpoint that a test may tamper with."""
    return Path(shutil.copytree(llava_path, tmp_path / "model"))


def _tensor(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(key)


def _sharded(model: Path, shard: str) -> None:
    """Turn the single-file checkpoint into an indexed one whose weight_map names `shard` only."""
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in keys}}))


def _clean(tmp_path: Path) -> bool:
    """Nothing written: no output folder, no temporary folder beside it."""
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


# -------------------------------------------------------------------------- item 1: shard names
@pytest.mark.parametrize("name", ["../victim/model.safetensors", "ABSOLUTE", "..", "model.safetensors/../x.safetensors",
                                  "sub/model.safetensors"])
def test_shard_names_must_be_plain_file_names_in_the_checkpoint(eng, model, tmp_path, name):
    """A crafted index must not make bake read or rewrite a file outside the checkpoint (the victim:
    a valid shard of the same model, which the old bake rewrote in place)."""
    victim = tmp_path / "victim" / "model.safetensors"
    victim.parent.mkdir()
    shutil.copy2(model / "model.safetensors", victim)
    (model / "sub").mkdir()
    shutil.copy2(model / "model.safetensors", model / "sub" / "model.safetensors")
    before = victim.read_bytes()
    _sharded(model, str(victim) if name == "ABSOLUTE" else name)
    with pytest.raises(MMNError, match="plain .safetensors file names"):
        bake(model, perturb(eng, [(1, 3)], sigma=0.5), tmp_path / "out")
    assert victim.read_bytes() == before and _clean(tmp_path)


def test_cli_refuses_a_crafted_index_in_one_line(eng, model, tmp_path, capsys):
    patch = perturb(eng, [(1, 3)], sigma=0.5).save(tmp_path / "p.mmnpatch.safetensors")
    _sharded(model, "../../../x/model.safetensors")
    assert main(["patch", "bake", "--model", str(model), "--patch", str(patch), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmn: error:") and "'../../../x/model.safetensors'" in err and err.count("\n") == 1


@pytest.mark.parametrize("content", ["not json", json.dumps({"weights": {}}), json.dumps({"weight_map": []})])
def test_an_index_without_a_weight_map_is_refused(eng, model, tmp_path, content):
    (model / "model.safetensors.index.json").write_text(content)
    with pytest.raises(MMNError, match="model.safetensors.index.json"):
        bake(model, perturb(eng, [(1, 3)], sigma=0.5), tmp_path / "out")
    assert _clean(tmp_path)


@pytest.mark.parametrize("what", ["shard", "indexed shard", "other file"])
def test_symlinks_out_of_the_checkpoint_are_refused(eng, model, tmp_path, what):
    """A shard or tokenizer file linked to a file outside the folder: bake would read it, and copy
    it into a checkpoint its user may publish. (Hub cache snapshots link into their repository's
    blobs: test_patch_safety.py bakes one.)"""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    name = "tokenizer.json" if what == "other file" else "model.safetensors"
    shutil.move(model / name, outside / name)
    (model / name).symlink_to(os.path.relpath(outside / name, model))
    if what == "indexed shard":
        _sharded(model, "model.safetensors")
        (model / "model.safetensors").symlink_to(os.path.relpath(outside / name, model))
    with pytest.raises(MMNError, match="outside the checkpoint folder"):
        bake(model, perturb(eng, [(1, 3)], sigma=0.5), tmp_path / "out")
    assert _clean(tmp_path)


# ------------------------------------------------------------- item 2: bake checks what apply checks
def _crafted(path: Path, layer: int, key: str, layout: str = "linear", n_layers: int = 2) -> Patch:
    """A patch whose entry for `layer` names checkpoint tensor `key` and records the hashes of that
    tensor's rows, so that a bake following the recorded name writes there."""
    t = _tensor(path, key)
    w = t.t() if layout == "conv1d" else t  # [d, F]
    idx = torch.tensor([1, 2])
    orig = gather_rows(w, idx)  # [2, d]
    entry = Entry(layer, idx, orig + 1.0, key.replace("language_model.model.", "model.language_model."), key, layout,
                  hashes_by_dtype(orig))
    base = {"architecture": "LlavaForConditionalGeneration", "n_layers": n_layers, "d_model": int(w.shape[0]),
            "d_mlp": int(w.shape[1]), "dtype": "float32"}
    return Patch({layer: entry}, base, "crafted", {}, {})


CRAFTED = {  # name: (layer, tensor the entry names, layout, n_layers, bake's refusal)
    "attention o_proj": (0, KEY.format(0, "self_attn.o_proj"), "linear", 2, "another model shape"),
    "MLP up_proj as Conv1D": (0, KEY.format(0, "mlp.up_proj"), "conv1d", 2, "does not hold the vectors"),
    "another layer's down_proj": (0, KEY.format(1, "mlp.down_proj"), "linear", 2, "does not hold the vectors"),
    "a layer the model lacks": (5, KEY.format(0, "mlp.down_proj"), "linear", 8, "the model has 2 decoder layers"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_bake_refuses_what_apply_refuses(eng, llava_path, tmp_path, case):
    layer, key, layout, n_layers, refusal = CRAFTED[case]
    patch = _crafted(llava_path, layer, key, layout, n_layers)
    with pytest.raises(PatchError, match=refusal):
        bake(llava_path, patch, tmp_path / "out")
    assert _clean(tmp_path)
    with pytest.raises(PatchError):
        eng.apply(patch)
    if layer < 2:
        assert {r["status"] for r in check_patch(eng, patch)} == {"mismatch"}


def test_forced_bake_writes_where_forced_apply_does(eng, llava_path, tmp_path):
    """An entry for layer 0 naming layer 1's tensor: with force, both write layer 0's MLP."""
    patch = _crafted(llava_path, 0, KEY.format(1, "mlp.down_proj"))
    bake(llava_path, patch, tmp_path / "out", force=True)
    with eng.apply(patch, force=True):
        live = {k: v.clone() for k, v in eng.model.state_dict().items()}
    assert torch.equal(_tensor(tmp_path / "out", KEY.format(1, "mlp.down_proj")),
                       _tensor(llava_path, KEY.format(1, "mlp.down_proj")))
    assert torch.equal(_tensor(tmp_path / "out", KEY.format(0, "mlp.down_proj")),
                       live["model.language_model.layers.0.mlp.down_proj.weight"])


def test_another_model_shape_is_named(eng, tmp_path, capsys):
    wide = tiny_llava(tmp_path / "wide", intermediate_size=128)
    patch = perturb(eng, [(1, 3)], sigma=0.5).save(tmp_path / "p.mmnpatch.safetensors")
    with pytest.raises(PatchError, match="another model shape"):
        bake(wide, patch, tmp_path / "out")
    assert main(["patch", "bake", "--model", str(wide), "--patch", str(patch), "--out", str(tmp_path / "out")]) == 2
    assert "another model shape" in capsys.readouterr().err and _clean(tmp_path)


@pytest.mark.parametrize("out", [".", "baked", "sub/baked"])
def test_out_inside_the_model_folder_is_refused(eng, model, out):
    with pytest.raises(MMNError, match="outside the base model"):
        bake(model, perturb(eng, [(1, 3)], sigma=0.5), model / out)
    assert not (model / "baked").exists() and not (model / "sub").exists()


# ----------------------------------------------------------------- temporary folders of killed bakes
def test_next_bake_removes_what_killed_bakes_left(eng, llava_path, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    stale = tmp_path / ".out.k1ll3d_x.tmp"  # as mkdtemp names them
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a shard")
    running, other = tmp_path / ".out.runn1ng_.tmp", tmp_path / ".out.v2.abcdefgh.tmp"  # a live bake; out.v2's
    running.mkdir()
    other.mkdir()
    fd = os.open(running, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        bake(llava_path, perturb(eng, [(1, 3)], sigma=0.5), tmp_path / "out")
    finally:
        os.close(fd)
    assert not stale.exists() and running.is_dir() and other.is_dir() and (tmp_path / "out" / "mmn_bake.json").is_file()


def test_a_failed_bake_removes_its_temporary_folder(eng, llava_path, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mmn_fast.edit.bake, "save_file", fail)
    with pytest.raises(OSError):
        bake(llava_path, perturb(eng, [(1, 3)], sigma=0.5), tmp_path / "out")
    assert _clean(tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_ends_a_cli_bake_without_leftovers(eng, llava_path, tmp_path):
    """`timeout`, a job scheduler or `docker stop` send SIGTERM: the bake's temporary folder goes."""
    patch = perturb(eng, [(1, 3)], sigma=0.5).save(tmp_path / "p.mmnpatch.safetensors")
    script = (
        "import os, signal, sys\n"
        "import mmn_fast.edit.bake as b\n"
        "from mmn_fast.cli.main import main\n"
        "real = b.save_file\n"
        "def save(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "b.save_file = save\n"
        f"sys.exit(main(['patch', 'bake', '--model', {str(llava_path)!r}, '--patch', {str(patch)!r}, "
        f"'--out', {str(tmp_path / 'out')!r}]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rc = subprocess.run([sys.executable, "-c", script], env=env, timeout=300).returncode
    assert rc == 128 + signal.SIGTERM and _clean(tmp_path)
