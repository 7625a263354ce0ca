"""positions='image', method='grad' and heatmaps on models with mixture-of-experts layers, checked exactly
against independent fp64 recomputations from plain forward hooks (not mmn_fast's capture code).

An expert neuron's activation at a position is g_e * h_{e,i} (0 where expert e was not routed), a shared
expert's or a dense layer's neuron's is h_i; its score is activation x <its output vector, W_U[t]>."""
import numpy as np
import pytest
import torch

import mmn_fast
from mmn_fast import MMNError
from mmn_fast.find.heatmap import concept_signs, maps, trace, write_heatmaps
from mmn_fast.testing import random_images

KW = dict(concepts="all", top_k=6, max_new_tokens=5, batch_size=2)


@pytest.fixture(scope="module")
def images():
    return random_images(2, size=32, seed=3)


@pytest.fixture(scope="module")
def engine(moe_checkpoint):
    _name, path, processor = moe_checkpoint
    eng = mmn_fast.load(path, processor=processor, device="cpu", dtype="float64")
    assert eng.adapter.is_moe
    return eng


@pytest.fixture(scope="module")
def found(engine, images):
    return engine.find(images, **KW)


def plain_forward(engine, image, caption=None):
    """One forward of `image`'s prompt (+ caption, teacher-forced) with plain hooks: per layer what it saw
    ({'h': a dense layer's down_proj input, 'route': the experts module's (x, idx, w), 'shared': the shared
    expert's down_proj input}), the input ids, and the positions predicting the caption's tokens."""
    ad = engine.adapter
    run = engine.encode([image], "Describe the image.")
    where = None
    if caption is not None:
        run, where = engine.teacher_forced(run, [caption])
    seen = [{} for _ in range(ad.n_layers)]
    hooks = []
    for layer, block in enumerate(ad.experts):
        targets = ([(ad.out_projs[layer], "h")] if block is None else
                   [(block.experts, "route")] + ([(block.shared.down_proj, "shared")] if block.shared is not None else []))
        for module, key in targets:
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, layer=layer, key=key: seen[layer].setdefault(key, tuple(a.detach() for a in args))))
    try:
        with torch.no_grad():
            engine.model(**run, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen, run["input_ids"][0], where


def activation(engine, seen, layer, expert, index) -> torch.Tensor:
    """[T] the neuron's activation at every position of the plain forward."""
    block = engine.adapter.experts[layer]
    if block is None or expert == block.n_experts:
        h = seen[layer]["h" if block is None else "shared"][0]
        return h.reshape(-1, h.shape[-1])[:, index]
    x, idx, w = seen[layer]["route"]  # [T, d], [T, k], [T, k]
    with torch.no_grad():
        gate, up = torch.nn.functional.linear(x, block.experts.gate_up_proj[expert]).chunk(2, dim=-1)
        h = block.experts.act_fn(gate) * up  # [T, F]: every row, routed or not
        g = (w * (idx == expert)).sum(-1)  # [T]: the router weight, 0 where not routed
    return g * h[:, index]


def out_vector(engine, layer, expert, index) -> torch.Tensor:
    block = engine.adapter.experts[layer]
    if block is None:
        return engine.adapter.out_projs[layer].weight[:, index].detach()
    if expert == block.n_experts:
        return block.shared.down_proj.weight[:, index].detach()
    return block.experts.down_proj[expert][:, index].detach()


def every_unit(engine, seen):
    """(layer, expert, index) of every neuron of a unit that ran (routed experts: chosen at some position)."""
    for layer, block in enumerate(engine.adapter.experts):
        if block is None:
            yield from ((layer, -1, i) for i in range(engine.adapter.out_projs[layer].weight.shape[1]))
            continue
        chosen = sorted(set(seen[layer]["route"][1].flatten().tolist()) & set(range(block.n_experts)))
        n_shared = [block.n_experts] if block.shared is not None else []
        for e in chosen + n_shared:
            width = block.experts.down_proj.shape[2] if e < block.n_experts else block.shared.down_proj.weight.shape[1]
            yield from ((layer, e, i) for i in range(width))


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_image_positions_score_expert_neurons_exactly(engine, images, found, reduce):
    got = engine.find(images, positions="image", reduce=reduce, **KW)
    assert [r.output_ids for r in got] == [r.output_ids for r in found]
    seen, ids, _ = plain_forward(engine, images[0])
    image = ids == engine.adapter.image_token_id  # [T]
    assert int(image.sum()) > 0
    concepts = [c for c in got[0].concepts if c.neurons]
    assert concepts and all(len(n) == 4 for c in concepts for n in c.neurons)
    assert {n[1] for r in got for c in r.concepts for n in c.neurons} - {-1}, "no expert neuron ranks"
    for c in concepts[:2]:
        u = engine.adapter.unembed_weight()[c.token_id].detach()

        def want(layer, expert, index):
            a = activation(engine, seen, layer, expert, index)[image]  # [n_img]
            contrib = a * float(out_vector(engine, layer, expert, index) @ u)
            return float(contrib.mean() if reduce == "mean" else contrib.max())

        for layer, expert, index, score in c.neurons:
            assert score == pytest.approx(want(layer, expert, index), rel=1e-7, abs=1e-15), (c.word, layer, expert)
        # the top record is the best of every neuron, recomputed independently
        best = max(want(*n) for n in every_unit(engine, seen))
        assert c.neurons[0][3] == pytest.approx(best, rel=1e-7, abs=1e-15)


def test_grad_scores_equal_activation_times_finite_difference(engine, images, found):
    got = engine.find(images, method="grad", **KW)
    caption = found[0].output_ids
    concepts = [c for c in got[0].concepts if c.neurons]
    assert concepts and all(len(n) == 4 for c in concepts for n in c.neurons)
    seen, _ids, where = plain_forward(engine, images[0], caption)
    ad = engine.adapter
    full, _ = engine.teacher_forced(engine.encode([images[0]], "Describe the image."), [caption])
    checked_expert = False
    for c in concepts[:2]:
        pos = int(where[0, c.step])

        def logit(layer, expert, index, delta):
            """The concept's logit with the neuron's activation at `pos` moved by delta (a number, or a 0-d
            tensor to differentiate), by plain hooks: the down_proj input (dense, shared) or the experts
            module's output (moved by delta x the expert neuron's output vector) shifted."""
            block = ad.experts[layer]
            if block is None or expert == block.n_experts:
                module = ad.out_projs[layer] if block is None else block.shared.down_proj

                def shift(_m, args):
                    x = args[0].clone()
                    x.view(-1, x.shape[-1])[pos, index] += delta
                    return (x,) + args[1:]

                handle = module.register_forward_pre_hook(shift)
            else:
                vec = block.experts.down_proj[expert][:, index].detach()

                def shift(_m, _args, y):
                    y = y.clone()
                    y.view(-1, y.shape[-1])[pos] += delta * vec
                    return y

                handle = block.experts.register_forward_hook(shift)
            try:
                return engine.model(**full, use_cache=False).logits[0, pos, c.token_id]
            finally:
                handle.remove()

        for layer, expert, index, score in c.neurons[:4]:
            a = float(activation(engine, seen, layer, expert, index)[pos])
            t = torch.zeros((), dtype=torch.float64, requires_grad=True)
            slope = float(torch.autograd.grad(logit(layer, expert, index, t), t)[0])  # d logit / d activation
            assert score == pytest.approx(a * slope, rel=1e-7, abs=1e-15), (c.word, layer, expert, index)
            # and that slope is the logit's: central differences (the tiny models compute some parts in fp32,
            # so a step far above fp32 rounding, and a tolerance for the curvature it then sees)
            with torch.no_grad():
                fd = float(logit(layer, expert, index, 1e-3) - logit(layer, expert, index, -1e-3)) / 2e-3
            assert fd == pytest.approx(slope, rel=1e-3, abs=1e-6), (c.word, layer, expert, index)
            checked_expert |= 0 <= expert < (ad.experts[layer].n_experts if ad.experts[layer] else 0)
    assert checked_expert, "no routed expert neuron among the checked ones"


def test_heatmap_of_an_expert_neuron(engine, images, found):
    ad = engine.adapter
    routed = [(c, tuple(n[:3])) for c in found[0].concepts for n in c.neurons
              if ad.experts[n[0]] is not None and 0 <= n[1] < ad.experts[n[0]].n_experts]
    assert routed, "no routed expert neuron in the top neurons"
    c, unit = routed[0]
    extra = [tuple(n[:3]) for n in c.neurons[:3]]
    layer_moe = unit[0]
    block = ad.experts[layer_moe]
    if block.shared is not None:
        extra.append((layer_moe, block.n_experts, 1))
    neurons = list(dict.fromkeys([unit] + extra))
    t = trace(engine, [images[0]], neurons)
    seen, ids, _ = plain_forward(engine, images[0])
    image = ids == ad.image_token_id
    for k, n in enumerate(neurons):
        want = activation(engine, seen, *n)
        assert torch.allclose(t.acts[0, :, k].double(), want, rtol=1e-6, atol=1e-9 * float(want.abs().max())), n
        assert torch.allclose(t.image_rows(0)[:, k].double(), want[image], rtol=1e-6,
                              atol=1e-9 * float(want.abs().max())), n
    u = ad.unembed_weight()[c.token_id].detach()
    signs = concept_signs(engine, c.token_id, neurons)
    assert signs == [1.0 if float(out_vector(engine, *n) @ u) >= 0 else -1.0 for n in neurons]
    hm = maps(engine, [images[0]], [(0, [unit], c.token_id, None, None)])[0]
    assert hm.grid.size == int(image.sum()) and np.isfinite(hm.heat).all()
    grid = (activation(engine, seen, *unit)[image] * signs[0]).numpy()
    assert np.allclose(hm.grid.ravel(), grid, rtol=1e-6, atol=1e-9 * np.abs(grid).max())
    assert hm.overlay().size[0] > 0 and hm.mask.any()
    occl = maps(engine, [images[0]], [(0, [unit], c.token_id, found[0].output_ids, c.step)], method="occlusion")[0]
    assert occl.grid.size == int(image.sum()) and np.isfinite(occl.heat).all()


def test_write_heatmaps_of_moe_records(engine, images, found, tmp_path):
    recs = write_heatmaps(engine, images, found, tmp_path, n=3)
    assert recs and all(len(n) == 3 for r in recs for n in r["neurons"])
    want = {(r.id, c.word.lower()): [n[:3] for n in c.neurons[:3]] for r in found for c in r.concepts if c.neurons}
    assert all(r["neurons"] == want[(r["id"], r["concept"])] for r in recs)
    assert all((tmp_path / r["id"] / r["heatmap"]).is_file() for r in recs)


def test_moe_heatmap_neurons_must_name_their_expert(engine, images):
    with pytest.raises(MMNError, match="layer, expert, index"):
        trace(engine, [images[0]], [(0, 1)])
    with pytest.raises(MMNError, match="not 99"):
        trace(engine, [images[0]], [(len(engine.adapter.experts) - 1, 99, 0)])
    with pytest.raises(MMNError, match="mixture-of-experts"):
        trace(engine, [images[0]], [(0, -1 if engine.adapter.experts[0] is None else 0, 0)], activation="act_fn")


def test_fold_final_norm_scores_through_the_final_norm(engine, images, found):
    """fold_final_norm on an MoE model, as on a dense one: a * <w_i, g * W_U[t]> / rms(x) at the concept's
    position (g the final RMSNorm's weight, x its input), recomputed from plain hooks; the captions and the
    ranking's inputs are find's own."""
    folded = engine.find(images, fold_final_norm=True, **KW)
    assert [r.output_ids for r in folded] == [r.output_ids for r in found]
    ad = engine.adapter
    norm = ad.final_norm
    r = folded[0]
    seen, _ids, where = plain_forward(engine, images[0], r.output_ids)
    xs = []
    hook = norm.register_forward_pre_hook(lambda _m, args: xs.append(args[0].detach()) and None)
    try:
        run, _ = engine.teacher_forced(engine.encode([images[0]], "Describe the image."), [r.output_ids])
        with torch.no_grad():
            engine.model(**run, use_cache=False)
    finally:
        hook.remove()
    x = xs[0].reshape(-1, xs[0].shape[-1])  # [T, d]
    checked = 0
    for c in [c for c in r.concepts if c.neurons][:2]:
        pos = int(where[0, c.step])
        rms = (x[pos].pow(2).mean() + norm.variance_epsilon).sqrt()
        u = norm.weight.detach() * ad.unembed_weight()[c.token_id].detach()  # [d]
        for layer, expert, index, score in c.neurons[:3]:
            block = ad.experts[layer]
            if block is None:
                w = ad.out_projs[layer].weight[:, index]
            elif expert == block.n_experts:
                w = block.shared.down_proj.weight[:, index]
            else:
                w = block.experts.down_proj[expert][:, index]
            want = activation(engine, seen, layer, expert, index)[pos] * (w.detach() @ u) / rms
            assert score == pytest.approx(float(want), rel=1e-7, abs=1e-12), (c.word, layer, expert, index)
            checked += 1
    assert checked
