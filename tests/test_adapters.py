"""Adapters: registered LLaVA / InstructBLIP, discovery on custom trees, overrides, errors."""
import pytest
import torch

import mmn_fast
from mmn_fast.model.adapters import Adapter, discover_spec, spec_for
from mmn_fast.errors import MMNError


def _check_results(engine, results):
    cons = [c for r in results for c in r.concepts]
    assert cons, "no concept was scored"
    ad = engine.adapter
    for c in cons:
        assert c.neurons and all(0 <= l < ad.n_layers and 0 <= i < ad.d_mlp for l, i, _ in c.neurons)
        scores = [s for _, _, s in c.neurons]
        assert scores == sorted(scores, reverse=True)


def test_llava_end_to_end(llava, images):
    assert llava.adapter.spec.layers == "model.language_model.layers"
    _check_results(llava, llava.find(images[:2], concepts="all", max_new_tokens=6, top_k=5))


def test_instructblip_end_to_end(instructblip_path, images):
    eng = mmn_fast.load(instructblip_path, device="cpu")
    assert type(eng.model).__name__ == "InstructBlipForConditionalGeneration"
    inputs = eng.encode(images[:1], "Describe the image.", None)
    n_img = int((inputs["input_ids"] == eng.adapter.image_token_id).sum())
    assert n_img == eng.model.config.num_query_tokens == 32  # the query tokens are the image positions
    _check_results(eng, eng.find(images[:2], concepts="all", max_new_tokens=6, top_k=5))
    _check_results(eng, eng.find(images[:2], concepts="all", max_new_tokens=6, top_k=5, positions="image"))


def test_mplug_owl2_like_custom_tree_is_discovered(mplug_path, images):
    eng = mmn_fast.load(mplug_path, device="cpu")
    spec = eng.adapter.spec
    assert (spec.layers, spec.mlp, spec.out_proj, spec.act_fn) == ("model.layers", "mlp", "down_proj", "act_fn")
    assert spec.final_norm == "model.norm" and spec.unembed == "lm_head"
    inputs = eng.encode(images[:1], "Describe the image.", None)
    assert int((inputs["input_ids"] == eng.adapter.image_token_id).sum()) == 65
    _check_results(eng, eng.find(images[:3], concepts="all", max_new_tokens=6, top_k=5, batch_size=2))
    _check_results(eng, eng.find(images[:2], concepts="all", max_new_tokens=6, top_k=5, activation="act_fn"))


def test_image_processor_found_by_name_when_the_auto_class_needs_torchvision(mplug_path, tmp_path, monkeypatch):
    """Some transformers 5.x releases gate AutoImageProcessor itself on torchvision."""
    import shutil

    import transformers

    from mmn_fast.find.engine import _load_processor

    def needs_torchvision(*_a, **_k):
        raise ImportError("AutoImageProcessor requires the Torchvision library")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", needs_torchvision)
    _, _, image_processor, _ = _load_processor(mplug_path)
    assert type(image_processor).__name__.startswith("CLIPImageProcessor")
    assert image_processor.crop_size["height"] == 32  # read from the checkpoint, not a default
    path = shutil.copytree(mplug_path, tmp_path / "ckpt")
    (path / "preprocessor_config.json").unlink()
    assert _load_processor(path)[2] is None  # nothing to go by: no image processor, no error


def test_gpt2_style_conv1d_mlp_is_discovered():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=50, n_positions=64))
    spec = discover_spec(model)
    assert (spec.layers, spec.mlp, spec.out_proj, spec.act_fn, spec.gated) == ("transformer.h", "mlp", "c_proj", "act", False)
    assert spec.final_norm == "transformer.ln_f"
    ad = Adapter(model, spec)
    h = torch.randn(5, ad.d_mlp)
    proj = ad.out_projs[1]
    torch.testing.assert_close(h @ ad.out_weight(1).t() + proj.bias, proj(h))  # column i = neuron i's vector


def test_gemma_final_norm_scale_is_one_plus_weight():
    """Gemma's RMSNorm multiplies by (1 + weight): folding the norm must use that scale."""
    from transformers import GemmaConfig, GemmaForCausalLM

    model = GemmaForCausalLM(GemmaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         vocab_size=60)).double()
    with torch.no_grad():
        model.model.norm.weight.normal_()
    ad = Adapter(model, discover_spec(model))
    x = torch.ones(1, 32, dtype=torch.float64)  # rms 1: the norm's output is its scale / sqrt(1 + eps)
    expected = model.model.norm(x)[0] * (1 + ad.norm_eps()) ** 0.5
    torch.testing.assert_close(ad.norm_weight(), expected.detach())


def test_opt_style_mlp_on_the_layer_itself():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=2,
                                     vocab_size=60, word_embed_proj_dim=32, max_position_embeddings=64))
    spec = discover_spec(model)
    assert (spec.layers, spec.mlp, spec.out_proj) == ("model.decoder.layers", "", "fc2")
    assert Adapter(model, spec).d_mlp == 48


def test_overrides_and_unknown_fields(llava):
    spec = spec_for(llava.model, {"final_norm": None, "act_fn": "act_fn"})
    assert spec.layers == "model.language_model.layers"
    with pytest.raises(MMNError, match="unknown adapter override"):
        spec_for(llava.model, {"mlp_path": "x"})
    with pytest.raises(MMNError, match="not found"):
        Adapter(llava.model, spec_for(llava.model, {"layers": "model.nothing.here"}))


def test_wrapping_a_loaded_model_needs_a_processor(llava):
    with pytest.raises(MMNError, match="processor"):
        mmn_fast.load(llava.model)
    eng = mmn_fast.load(llava.model, processor=llava.processor, device="cpu")
    assert eng.adapter.n_layers == llava.adapter.n_layers


def test_unsupported_model_names_what_to_override():
    class NoMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
            self.head = torch.nn.Linear(4, 10)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(MMNError, match="could not find the decoder MLPs.*layers="):
        discover_spec(NoMLP())
