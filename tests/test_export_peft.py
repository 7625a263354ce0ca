"""`mmn patch export --format peft` / `mmn_fast.export_peft`: PEFT loads the adapter on the checkpoint and
gives what `engine.apply` gives; merging it gives what `mmn patch bake` writes."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, GPT2Config, GPT2LMHeadModel

import mmn_fast
from mmn_fast import MMNError, export_peft
from mmn_fast.cli.main import main
from mmn_fast.edit.bake import bake
from mmn_fast.edit.export import lora_tensors
from mmn_fast.model.live import resolve_target
from mmn_fast.model.patch_file import make_patch
from mmn_fast.testing import random_images, tiny_llava

peft = pytest.importorskip("peft")
PROMPT = "Describe the image."


def random_patch(adapter, spec: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    d = adapter.out_weight(0).shape[0]
    return make_patch(adapter, {l: (torch.tensor(ix), 4 * torch.randn(len(ix), d, generator=g))
                                for l, ix in spec.items()}, "test", {"source": "x"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tiny_llava(tmp_path_factory.mktemp("llava_peft"), seed=5)
    engine = mmn_fast.load(path, device="cpu")
    patch = random_patch(engine.adapter, {0: [3, 17, 40, 41, 90], 1: [8, 9]}, seed=1)  # ranks 5 and 2: padded
    patch_file = patch.save(tmp_path_factory.mktemp("p") / "p.mmnpatch.safetensors")
    return path, engine, patch, patch_file


def peft_model(path, adapter_dir):
    base = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True).eval()
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def test_adapter_files(setup, tmp_path):
    path, engine, patch, patch_file = setup
    done = export_peft(patch_file, path, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert done["rank"] == cfg["r"] == cfg["lora_alpha"] == 5 and cfg["peft_type"] == "LORA"
    names = [n for n, m in engine.model.named_modules() if m is engine.adapter.out_projs[0] or
             m is engine.adapter.out_projs[1]]
    assert cfg["target_modules"] == names and not cfg["fan_in_fan_out"]
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    a, b = tensors[f"base_model.model.{names[1]}.lora_A.weight"], tensors[f"base_model.model.{names[1]}.lora_B.weight"]
    assert a.shape == (5, engine.adapter.d_mlp) and b.shape == (engine.adapter.out_weight(1).shape[0], 5)
    assert torch.equal(a[:2].nonzero()[:, 1], torch.tensor([8, 9])) and not a[2:].any() and not b[:, 2:].any()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_peft_logits_and_captions_equal_apply(setup, tmp_path):
    path, engine, patch, patch_file = setup
    export_peft(patch, engine, tmp_path / "a")
    model = peft_model(path, tmp_path / "a")
    images = random_images(3, size=32, seed=2)
    inputs = engine.encode(images, PROMPT)
    with torch.no_grad():
        got = model(**inputs).logits
        with engine.patched(patch):
            want = engine.model(**inputs).logits
        base = engine.model(**inputs).logits
    assert ((got - want).abs().max() / want.abs().max()) <= 1e-5
    assert not torch.allclose(got, base, atol=1e-3)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1)[:, n:]
        with engine.patched(patch):
            ours = engine.model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1)[:, n:]
    assert torch.equal(tokens, ours)


def test_merge_and_unload_equals_bake(setup, tmp_path):
    path, engine, patch, patch_file = setup
    export_peft(patch_file, path, tmp_path / "a")
    merged = peft_model(path, tmp_path / "a").merge_and_unload().state_dict()
    bake(path, patch_file, tmp_path / "baked")
    baked = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "baked"), local_files_only=True).state_dict()
    assert merged.keys() == baked.keys()
    touched = {e.name: e.indices for e in patch.entries.values()}
    assert touched.keys() <= baked.keys()
    for key, w in baked.items():
        if key in touched:
            cols = touched[key]
            diff = (merged[key][:, cols] - w[:, cols]).abs().max() / w[:, cols].abs().max()
            assert diff <= 1e-6, key
            rest = torch.ones(w.shape[1], dtype=torch.bool)
            rest[cols] = False
            assert torch.equal(merged[key][:, rest], w[:, rest]), key
        else:
            assert torch.equal(merged[key], w), key


def test_gpt2_conv1d_gets_fan_in_fan_out(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).eval()
    model.save_pretrained(tmp_path / "gpt2")
    adapter = resolve_target(model)[1]
    patch = random_patch(adapter, {1: [2, 5, 60]}, seed=3)
    tensors, config = lora_tensors(model, patch)
    assert config["fan_in_fan_out"] and config["target_modules"] == ["transformer.h.1.mlp.c_proj"]
    out = tmp_path / "a"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    wrapped = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), str(out)).eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = wrapped(input_ids=ids).logits
        with mmn_fast.model.live.patched(model, patch):
            want = model(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_cli_export_and_bad_input(setup, tmp_path, capsys):
    path, engine, patch, patch_file = setup
    out = tmp_path / "adapter"
    assert main(["patch", "export", "--patch", str(patch_file), "--format", "peft", "--model", str(path),
                 "--out", str(out)]) == 0
    assert "rank 5" in capsys.readouterr().out
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(["patch", "export", str(patch_file), "--model", str(path), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "adapter_model.safetensors").read_bytes() == before
    assert main(["patch", "export", str(patch_file), "--model", str(path), "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["patch", "export", str(patch_file), "--model", str(path), "--out", str(other), "--overwrite"]) == 2
    assert "not an adapter's" in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"
    foreign_engine = mmn_fast.load(tiny_llava(tmp_path / "other_model", seed=9), device="cpu")
    foreign = random_patch(foreign_engine.adapter, {0: [1]}, seed=2).save(tmp_path / "f.mmnpatch.safetensors")
    assert main(["patch", "export", "--patch", str(foreign), "--model", str(path), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "Traceback" not in err and not (tmp_path / "f").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    with pytest.raises(MMNError, match="exists"):
        export_peft(patch, engine, out)
