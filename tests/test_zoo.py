"""Every supported VLM family end to end, from a tiny random checkpoint built from its config: load from disk,
find (its top neuron's score equal to an independent fp64 recomputation with plain forward hooks),
teacher-forced find, positions='image' (where defined), method='grad', a heatmap, a patch applied and reverted
bit for bit, and bake then reload. Families mmn_fast does not take are refused at load with a clear error."""
import importlib.util

import pytest
import torch
import transformers

import mmn_fast
from mmn_fast import MMNError
from mmn_fast.cli.main import main
from mmn_fast.edit.bake import bake
from mmn_fast.find.capture import capture, gather_positions, last_position
from mmn_fast.find.moe_scoring import concept_parts, moe_capture, moe_graph
from mmn_fast.find.scoring import Scorer
from mmn_fast.find.heatmap import maps
from mmn_fast.model.patch_file import make_patch
from mmn_fast.testing import random_images, tiny_tokenizer
from mmn_fast.testing.instructblip import tiny_instructblip
from mmn_fast.testing.llava import llava_model, tiny_llava_next
from mmn_fast.testing.qwen2_vl import qwen2_vl_model
from mmn_fast.testing.zoo import ZOO_MODELS, save

DENSE = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "idefics3", "smolvlm",
         "paligemma", "gemma3", "mllama", "internvl", "aya_vision", "mistral3", "blip2", "instructblip"]
# Heatmaps lay image tokens on the image's patch grid; these families' image tokens are not one grid.
NO_PATCH_GRID = {"llava_next": "anyres", "llava_onevision": "anyres", "blip2": "Q-Former", "instructblip": "Q-Former"}
BUILDERS = {**ZOO_MODELS, "llava": llava_model, "qwen2_vl": qwen2_vl_model}
SAVERS = {"instructblip": tiny_instructblip, "llava_next": tiny_llava_next}


@pytest.fixture(scope="module")
def images():
    return random_images(2, size=32, seed=3)


def checkpoint(name, path):
    """(saved checkpoint path, its processor in memory: some cannot be reloaded here without torchvision)."""
    if name in SAVERS:  # saved by the factory itself; the processor reloads from disk
        return SAVERS[name](path), None
    model, processor = BUILDERS[name]()
    return save(path, model, processor), processor


def hooked_score(engine, image, caption: list[int], step: int, layer: int, index: int) -> float:
    """a * <W_out[:, i], W_U[t]> at the position that predicts caption[step], from a plain forward pre-hook
    on the output projection (not mmn_fast's capture code), in the engine's dtype (fp64 here)."""
    inputs = engine.encode([image], "Describe the image.")
    full, where = engine.teacher_forced(inputs, [caption])
    seen = []
    out_proj = engine.adapter.out_projs[layer]
    handle = out_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            engine.model(**full, use_cache=False)
    finally:
        handle.remove()
    h = seen[0]
    h = h.reshape(1, -1, h.shape[-1])  # [1, T, F] (OPT hands fc2 [T, F])
    a = h[0, int(where[0, step]), index]
    w_out = engine.adapter.out_weight(layer)[:, index].detach()
    w_u = engine.adapter.unembed_weight()[caption[step]].detach()
    return float(a * (w_out.double() @ w_u.double()))


@pytest.mark.parametrize("name", DENSE)
def test_family_end_to_end(name, images, tmp_path):
    path, processor = checkpoint(name, tmp_path / "ckpt")
    engine = mmn_fast.load(path, processor=processor, device="cpu", dtype="float64")
    kw = dict(concepts="all", top_k=3, max_new_tokens=5, batch_size=2)
    found = engine.find(images, **kw)
    assert len(found) == 2 and all(r.output_ids for r in found)

    # exactness: the top neuron of each concept of image 0, recomputed with a plain hook in fp64
    concepts = [c for c in found[0].concepts if c.neurons]
    for c in concepts[:2]:
        layer, index, score = c.neurons[0]
        want = hooked_score(engine, images[0], found[0].output_ids, c.step, layer, index)
        assert score == pytest.approx(want, rel=1e-7, abs=1e-12), (name, c.word)

    # teacher-forced: the same captions give the same top neurons and scores
    forced = engine.find(images, captions=[r.output_ids for r in found], **kw)
    for got, want in zip(forced, found):
        assert [c.word for c in got.concepts] == [c.word for c in want.concepts]
        for cg, cw in zip(got.concepts, want.concepts):
            assert [n[:2] for n in cg.neurons] == [n[:2] for n in cw.neurons]
            assert [n[2] for n in cg.neurons] == pytest.approx([n[2] for n in cw.neurons], rel=1e-6, abs=1e-12)

    if engine.adapter.cross_attention:
        with pytest.raises(MMNError, match="cross-attention"):
            engine.find(images, positions="image", **kw)
    else:
        assert len(engine.find(images, positions="image", **kw)) == 2
    assert len(engine.find(images, method="grad", **kw)) == 2

    if concepts and not engine.adapter.cross_attention:
        c = concepts[0]
        item = (0, [tuple(c.neurons[0][:2])], c.token_id, found[0].output_ids, c.step)
        if name in NO_PATCH_GRID:
            with pytest.raises(MMNError, match=NO_PATCH_GRID[name]):
                maps(engine, images, [item])
        else:
            (hm,) = maps(engine, images, [item])
            w, h = hm.overlay().size  # shown at least DISPLAY_MIN pixels wide, in the image's proportions
            assert w * images[0].size[1] == h * images[0].size[0]

    # a patch applied and reverted bit for bit, then baked into a checkpoint that reloads with it
    engine32 = mmn_fast.load(path, processor=processor, device="cpu")
    ad = engine32.adapter
    before = [ad.out_weight(l).clone() for l in range(ad.n_layers)]
    g = torch.Generator().manual_seed(1)
    patch = make_patch(ad, {1: (torch.tensor([0, 5]), torch.randn(2, ad.out_weight(1).shape[0], generator=g))}, "test")
    handle = engine32.apply(patch)
    assert torch.equal(ad.out_weight(1)[:, 5], patch.entries[1].vectors[1])
    handle.revert()
    assert all(torch.equal(ad.out_weight(l), w) for l, w in enumerate(before))
    patch_file = patch.save(tmp_path / "p.mmnpatch.safetensors")
    bake(path, patch_file, tmp_path / "baked")
    baked = mmn_fast.load(tmp_path / "baked", processor=processor, device="cpu").adapter
    assert torch.equal(baked.out_weight(1)[:, [0, 5]].t(), patch.entries[1].vectors)
    assert torch.equal(baked.out_weight(0), before[0])


@pytest.mark.parametrize("name,words", [("florence2", "encoder-decoder")])
def test_unsupported_families_are_refused_at_load(name, words, tmp_path):
    model, processor = BUILDERS[name]()
    with pytest.raises(MMNError, match=words):
        mmn_fast.load(save(tmp_path / "ckpt", model, processor), processor=processor, device="cpu")


def test_a_processor_that_cannot_load_is_one_clear_error_at_load(tmp_path):
    """Qwen2.5-VL's saved processor needs torchvision to reload (its video processor); where it is missing,
    load says so instead of failing later at the first find (the prompt would hold no image tokens)."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the processor reloads")
    model, processor = BUILDERS["qwen2_5_vl"]()
    with pytest.raises(MMNError, match="processor could not be loaded .*pass processor="):
        mmn_fast.load(save(tmp_path / "ckpt", model, processor), device="cpu")


def moe_hooked_score(engine, image, caption, step, layer, expert, index, outputs):
    """The score of neuron (layer, expert, index), from plain forward hooks on a teacher-forced pass: the
    experts module's call (rows, routing), the shared expert's and dense layers' down_proj inputs."""
    inputs = engine.encode([image], "Describe the image.")
    full, where = engine.teacher_forced(inputs, [caption])
    pos = int(where[0, step])
    ad = engine.adapter
    block = ad.experts[layer]
    seen = {}
    if block is None:
        target, key = ad.out_projs[layer], "h"
    elif expert == block.n_experts:
        target, key = block.shared.down_proj, "h"
    else:
        target, key = block.experts, "route"
    handle = target.register_forward_pre_hook(lambda _m, args: seen.setdefault(key, args))
    block_out = ad.mlps[layer].register_forward_hook(lambda _m, _a, y: outputs.append(y.detach()))
    try:
        with torch.no_grad():
            engine.model(**full, use_cache=False)
    finally:
        handle.remove()
        block_out.remove()
    u = ad.unembed_weight()[caption[step]].detach()
    if key == "h":
        h = seen["h"][0].reshape(-1, seen["h"][0].shape[-1])[pos]
        w = target.weight[:, index].detach()
        return float(h[index] * (w @ u)), pos
    x, idx, gates = seen["route"]
    slot = idx[pos].tolist().index(expert)  # the expert was chosen at this position
    with torch.no_grad():
        gate, up = torch.nn.functional.linear(x[pos], block.experts.gate_up_proj[expert]).chunk(2)
        h = block.experts.act_fn(gate) * up
        return float(gates[pos, slot] * h[index] * (block.experts.down_proj[expert][:, index] @ u)), pos


@pytest.mark.parametrize("name", ["qwen3_vl_moe", "glm4v_moe", "llava_deepseek_moe"])
def test_moe_family_scores_expert_neurons_exactly(name, images, tmp_path):
    model, processor = BUILDERS[name]()
    path = save(tmp_path / "ckpt", model, processor)
    engine = mmn_fast.load(path, processor=processor, device="cpu", dtype="float64")
    assert engine.adapter.is_moe
    kw = dict(concepts="all", top_k=6, max_new_tokens=5, batch_size=2)
    found = engine.find(images, **kw)
    concepts = [c for c in found[0].concepts if c.neurons]
    assert concepts and all(len(n) == 4 for c in concepts for n in c.neurons)
    experts_seen = {n[1] for c in found[0].concepts + found[1].concepts for n in c.neurons}
    assert experts_seen - {-1}, "no expert neuron ranks in any top-k"
    for c in concepts[:2]:
        for layer, expert, index, score in c.neurons[:3]:
            want, _ = moe_hooked_score(engine, images[0], found[0].output_ids, c.step, layer, expert, index, [])
            assert score == pytest.approx(want, rel=1e-7, abs=1e-12), (name, c.word, layer, expert, index)

    # every neuron of an MoE layer together writes exactly the block's output: their scores sum to its logit
    c = concepts[0]
    inputs = engine.encode([images[0]], "Describe the image.")
    full, where = engine.teacher_forced(inputs, [found[0].output_ids])
    with torch.no_grad(), moe_capture(engine.adapter, gather_positions(where)) as store:
        outputs = {}
        hooks = [engine.adapter.mlps[l].register_forward_hook(
            lambda _m, _a, y, l=l: outputs.setdefault(l, y.detach())) for l in range(engine.adapter.n_layers)]
        try:
            engine.model(**full, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
    parts = concept_parts(engine.adapter, store, 0, c.step, c.token_id)
    u = engine.adapter.unembed_weight()[c.token_id].detach()
    for layer, block in enumerate(engine.adapter.experts):
        if block is None:
            continue
        total = sum(float(p[3].sum()) for p in parts if p[0] == layer)
        y = outputs[layer].reshape(1, -1, u.numel())[0, int(where[0, c.step])]
        assert total == pytest.approx(float(y @ u), rel=1e-9, abs=1e-12), layer

    forced = engine.find(images, captions=[r.output_ids for r in found], **kw)
    for got, want in zip(forced, found):
        for cg, cw in zip(got.concepts, want.concepts):
            assert [n[:3] for n in cg.neurons] == [n[:3] for n in cw.neurons]
    # positions='image' and method='grad' score expert neurons too (checked exactly in test_moe_modes.py)
    for options in (dict(positions="image"), dict(positions="image", reduce="max"), dict(method="grad"),
                    dict(fold_final_norm=True)):
        other = engine.find(images, **options, **kw)
        assert [r.output_ids for r in other] == [r.output_ids for r in found]
        assert all(len(n) == 4 for r in other for c in r.concepts for n in c.neurons), options
        assert {n[1] for r in other for c in r.concepts for n in c.neurons} - {-1}, options
    with pytest.raises(MMNError, match="mixture-of-experts"):
        engine.find(images, activation="act_fn", **kw)
    # rows all on the base model: per-request patches change nothing; a real one is refused by name
    base_rows = engine.find(images, patches=[None, None], **kw)
    assert [[c.neurons for c in r.concepts] for r in base_rows] == [[c.neurons for c in r.concepts] for r in found]
    d = engine.adapter.unembed_weight().shape[1]
    moe_layer = next(l for l, b in enumerate(engine.adapter.experts) if b is not None)
    with pytest.raises(MMNError, match="per-request patches take dense"):
        engine.patches.load("e", make_patch(engine.adapter, {(moe_layer, 0): (torch.tensor([1]), torch.ones(1, d))}, "t"))
    dense = next((l for l, b in enumerate(engine.adapter.experts) if b is None), None)
    if dense is not None:  # a dense layer's patch is served per request by caption, not yet scored by find
        engine.patches.load("dense", make_patch(engine.adapter, {dense: (torch.tensor([1]), torch.ones(1, d))}, "t"))
        with pytest.raises(MMNError, match="mixture-of-experts"):
            engine.find(images, patches=[None, "dense"], **kw)
        engine.patches.unload("dense")
    with pytest.raises(MMNError, match="mixture-of-experts"):
        engine.find(images, keep_scores=True, **kw)
    folder = tmp_path / "images"
    folder.mkdir()
    images[0].save(folder / "a.png")
    assert main(["find", "--model", str(path), "--images", str(folder), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_phi4_multimodal_model_side():
    """Phi-4-multimodal (its processor needs torchvision and audio features): the model side. Discovery
    finds its fused gate_up_proj MLPs; the capture and the scorer on a text forward equal a plain hook."""
    tok = tiny_tokenizer()
    vision = transformers.Phi4MultimodalVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=32, patch_size=8)
    audio = transformers.Phi4MultimodalAudioConfig(
        hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2, ext_pw_out_channel=32,
        depthwise_separable_out_channel=32, nemo_conv_channels=32)
    config = transformers.Phi4MultimodalConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vision_config=vision, audio_config=audio, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.Phi4MultimodalForCausalLM(config).double().eval()
    engine = mmn_fast.load(model, processor=tok, device="cpu")
    ad = engine.adapter
    assert ad.spec.layers == "model.layers" and ad.spec.out_proj == "down_proj" and ad.act_fns is not None
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    seen = []
    plain = ad.out_projs[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad(), capture(ad, select=last_position) as store:
            model(input_ids=ids)
    finally:
        plain.remove()
    tokens = [7, 11]
    scores = Scorer(ad).score(store.acts()[:, 0], tokens)  # [2, L, F]
    for b, t in enumerate(tokens):
        want = seen[0][b, -1] * (ad.out_weight(1).t() @ ad.unembed_weight()[t])
        assert torch.allclose(scores[b, 1], want, rtol=1e-10, atol=1e-14)
    before = ad.out_weight(0).clone()
    patch = make_patch(ad, {0: (torch.tensor([3]), torch.randn(1, 64, dtype=torch.float64))}, "test")
    engine.apply(patch).revert()
    assert torch.equal(ad.out_weight(0), before)


def llama4_model():
    """A tiny Llama 4 (dense layer 0, layer 1 input-gated experts: 4, top-2, a shared expert), fp64, and its
    tokenizer (Llama 4's image processor needs torchvision: the model side is tested)."""
    tok = tiny_tokenizer()
    text = transformers.Llama4TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        interleave_moe_layer_step=2, moe_layers=[1], max_position_embeddings=256, attention_chunk_size=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False)
    vision = transformers.Llama4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8, vision_output_dim=64,
                                             projector_input_dim=64, projector_output_dim=64)
    torch.manual_seed(0)
    config = transformers.Llama4Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    return transformers.Llama4ForConditionalGeneration(config).double().eval(), tok


def test_llama4_input_gated_experts_model_side(tmp_path):
    """Llama 4 scales each expert's input by its router score (experts(x * g)) and stores experts [E, d, 2F] /
    [E, F, d]: scores equal a recomputation from plain hooks (the block's input, the router's scores), the MoE
    layer's neurons sum to the block's logit contribution, grad's eager recomputation matches the module,
    and an expert patch applies, reverts and bakes into the [E, F, d] tensor."""
    model, tok = llama4_model()
    engine = mmn_fast.load(model, processor=tok, device="cpu")
    ad = engine.adapter
    block = ad.experts[1]
    assert ad.experts[0] is None and block.gating == "input" and block.d_expert == 32
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    seen = {}

    def keep(name, value) -> None:  # (a hook that returned the value would replace the module's output)
        seen.setdefault(name, value.detach())

    hooks = [ad.mlps[1].register_forward_pre_hook(lambda _m, args: keep("x", args[0])),
             block.router.register_forward_hook(lambda _m, _a, out: keep("scores", out[0])),  # (scores, logits)
             ad.mlps[1].register_forward_hook(lambda _m, _a, out: keep("y", out[0]))]  # (output, router logits)
    try:
        with torch.no_grad(), moe_capture(ad, last_position) as store:
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    x = seen["x"].reshape(2, 9, -1)[:, -1]  # [2, d] the last position's block input
    scores = seen["scores"].reshape(2, 9, -1)[:, -1]  # [2, E]
    u = ad.unembed_weight()[7].detach()
    for b in range(2):
        parts = concept_parts(ad, store, b, 0, 7)
        got = {(l, e): s for l, e, _i, s in parts}
        for e in torch.nonzero(scores[b])[:, 0].tolist():  # the chosen experts, recomputed by hand
            gu = (x[b] * scores[b, e]) @ block.experts.gate_up_proj[e].detach()  # [2F]
            h = torch.nn.functional.silu(gu[:32]) * gu[32:]
            want = h * (block.experts.down_proj[e].detach() @ u)  # [F]
            assert torch.allclose(got[(1, e)], want, rtol=1e-10, atol=1e-14), e
        assert set(e for l, e in got if l == 1) == set(torch.nonzero(scores[b])[:, 0].tolist()) | {block.n_experts}
        total = sum(float(s.sum()) for l, _e, _i, s in parts if l == 1)
        assert total == pytest.approx(float(seen["y"].reshape(2, 9, -1)[b, -1] @ u), rel=1e-9, abs=1e-12)
    with torch.enable_grad(), moe_graph(ad) as graph:  # raises if the eager recomputation differs
        logits = model(input_ids=ids).logits
        grads = torch.autograd.grad(logits[0, -1, 7], graph.nodes(), allow_unused=True)
    assert graph.experts[1] and any(g is not None for g in grads)

    g = torch.Generator().manual_seed(2)
    patch = make_patch(ad, {(1, 2): (torch.tensor([0, 3]), torch.randn(2, 64, dtype=torch.float64, generator=g))}, "t")
    assert patch.expert_entries[(1, 2)].layout == "experts_t"
    before = block.experts.down_proj.detach().clone()
    handle = engine.apply(patch)
    assert torch.equal(block.experts.down_proj[2, 3], patch.expert_entries[(1, 2)].vectors[1])  # rows: [E, F, d]
    handle.revert()
    assert torch.equal(block.experts.down_proj.detach(), before)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    bake(tmp_path / "ckpt", patch.save(tmp_path / "p.mmnpatch.safetensors"), tmp_path / "baked")
    baked = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "baked", dtype=torch.float64)
    down = baked.language_model.model.layers[1].feed_forward.experts.down_proj.detach()
    assert torch.equal(down[2, [0, 3]], patch.expert_entries[(1, 2)].vectors)
    assert torch.equal(down[[0, 1, 3]], before[[0, 1, 3]]) and torch.equal(down[2, 1], before[2, 1])
