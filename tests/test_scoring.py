"""The fast find path against brute force, the reference, and itself across modes."""
from __future__ import annotations

import threading

import pytest
import torch

from mmn_fast import DEFAULT_PROMPT
from mmn_fast.find import engine as engine_module
from mmn_fast.find.reference import reference_find
from mmn_fast.find.scoring import Scorer

ALL = dict(concepts="all", max_new_tokens=8)


def _hooked_full_pass(engine, image, output_ids, target: str = "down_proj"):
    """Independent brute force: one forward over prompt + output with plain hooks on every layer.

    Returns (prompt_len, per-layer h [T, F] float64, final-norm input [T, d], mlp outputs [L, T, d])."""
    ad = engine.adapter
    inputs = engine.encode([image], DEFAULT_PROMPT, None)
    t = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([output_ids])], 1)
    mask = torch.ones_like(ids)
    hs, outs, norm_in = {}, {}, {}
    handles = [ad.out_projs[l].register_forward_pre_hook(lambda m, a, l=l: hs.__setitem__(l, a[0][0].double()))
               for l in range(ad.n_layers)]
    handles += [ad.mlps[l].register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o[0].double()))
                for l in range(ad.n_layers)]
    handles.append(ad.final_norm.register_forward_pre_hook(lambda m, a: norm_in.__setitem__(0, a[0][0].double())))
    try:
        with torch.no_grad():
            engine.model(**dict(inputs, input_ids=ids, attention_mask=mask), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return t, [hs[l] for l in range(ad.n_layers)], norm_in[0], torch.stack([outs[l] for l in range(ad.n_layers)])


def _full_projection(engine, layer):
    """[F, V] float64: the whole W_out^T W_U^T the fast path must never build."""
    return engine.adapter.out_weight(layer).double().t() @ engine.adapter.unembed_weight().double().t()


def _concepts(results):
    cons = [c for r in results for c in r.concepts]
    assert cons, "the model produced no scoreable words; pick other images"
    return cons


def test_scores_equal_float64_brute_force(llava64, images):
    eng = llava64
    res = eng.find(images[:3], batch_size=1, top_k=eng.adapter.n_layers * eng.adapter.d_mlp, **ALL)
    _concepts(res)
    proj = [_full_projection(eng, l) for l in range(eng.adapter.n_layers)]
    for img, r in zip(images[:3], res):
        t, hs, _, _ = _hooked_full_pass(eng, img, r.output_ids)
        for c in r.concepts:
            pos = t - 1 + c.step
            brute = torch.stack([hs[l][pos] * proj[l][:, c.token_id] for l in range(len(hs))])  # [L, F]
            got = torch.zeros_like(brute)
            for layer, index, score in c.neurons:
                got[layer, index] = score
            torch.testing.assert_close(got, brute, rtol=1e-9, atol=1e-12)


def test_fp32_scores_match_float64(llava, llava64, images):
    r32 = llava.find(images[:2], top_k=20, **ALL)
    r64 = llava64.find(images[:2], top_k=20, **ALL)
    for a, b in zip(r32, r64):
        assert a.output_ids == b.output_ids
        for ca, cb in zip(a.concepts, b.concepts):
            assert [n[:2] for n in ca.neurons[:5]] == [n[:2] for n in cb.neurons[:5]]
            torch.testing.assert_close(torch.tensor([n[2] for n in ca.neurons], dtype=torch.float64),
                                       torch.tensor([n[2] for n in cb.neurons], dtype=torch.float64),
                                       rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("activation", ["act_fn", "down_proj_input"])
def test_matches_reference_no_cache(llava, images, activation):
    """act_fn mode reproduces the released algorithm; the KV-cache path equals the no-cache one."""
    for img in images[:3]:
        fast = llava.find([img], activation=activation, top_k=100, **ALL)[0]
        ref = reference_find(llava, img, DEFAULT_PROMPT, activation=activation, top_k=100, **ALL)
        assert fast.output_ids == ref["output_ids"]
        assert len(fast.concepts) == len(ref["concepts"])
        for c, rc in zip(fast.concepts, ref["concepts"]):
            assert (c.word, c.token_id, c.step) == (rc["word"], rc["token_id"], rc["step"])
            assert [n[:2] for n in c.neurons] == [n[:2] for n in rc["neurons"]]
            got = torch.tensor([n[2] for n in c.neurons])
            want = torch.tensor([n[2] for n in rc["neurons"]])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_act_fn_differs_from_exact_on_gated_mlp(llava, images):
    """On SwiGLU the released code's activation omits the up factor: the scores must differ."""
    a = llava.find(images[:1], activation="act_fn", top_k=5, **ALL)[0]
    b = llava.find(images[:1], activation="down_proj_input", top_k=5, **ALL)[0]
    assert a.output_ids == b.output_ids
    assert any(ca.neurons != cb.neurons for ca, cb in zip(_concepts([a]), b.concepts))


def test_batch_of_8_equals_single_runs(llava, images):
    batched = llava.find(images, batch_size=8, top_k=30, **ALL)
    singles = [llava.find([img], batch_size=1, top_k=30, **ALL)[0] for img in images]
    _concepts(batched)
    for b, s in zip(batched, singles):
        assert b.output_ids == s.output_ids
        assert [(c.word, c.step) for c in b.concepts] == [(c.word, c.step) for c in s.concepts]
        for cb, cs in zip(b.concepts, s.concepts):
            assert [n[:2] for n in cb.neurons[:10]] == [n[:2] for n in cs.neurons[:10]]
            torch.testing.assert_close(torch.tensor([n[2] for n in cb.neurons]),
                                       torch.tensor([n[2] for n in cs.neurons]), rtol=1e-4, atol=1e-6)


def test_teacher_forced_equals_generation(llava, images):
    gen = llava.find(images, batch_size=4, top_k=30, **ALL)
    tf = llava.find(images, captions=[r.output_ids for r in gen], batch_size=4, top_k=30, **ALL)
    _concepts(gen)
    for g, t in zip(gen, tf):
        assert g.output_ids == t.output_ids
        for cg, ct in zip(g.concepts, t.concepts):
            assert (cg.word, cg.step, cg.token_id) == (ct.word, ct.step, ct.token_id)
            assert [n[:2] for n in cg.neurons[:10]] == [n[:2] for n in ct.neurons[:10]]
            torch.testing.assert_close(torch.tensor([n[2] for n in cg.neurons]),
                                       torch.tensor([n[2] for n in ct.neurons]), rtol=1e-4, atol=1e-6)


def test_teacher_forced_equals_generation_with_multimodal_rope(images):
    """Qwen2-VL derives 3-D position ids from the mask: teacher-forced mode (and the gradient
    baseline, which runs through it) must let it, and extend mm_token_type_ids over the caption."""
    import mmn_fast
    from mmn_fast.testing.qwen2_vl import qwen2_vl_model

    model, processor = qwen2_vl_model(torch_dtype=torch.float64)
    eng = mmn_fast.load(model, processor=processor, device="cpu")
    kw = dict(ALL, top_k=20, max_new_tokens=6, batch_size=2)
    gen = eng.find(images[:3], **kw)
    tf = eng.find(images[:3], captions=[r.output_ids for r in gen], **kw)
    _concepts(gen)
    for g, t in zip(gen, tf):
        for cg, ct in zip(g.concepts, t.concepts):
            assert (cg.word, cg.step) == (ct.word, ct.step)
            torch.testing.assert_close(torch.tensor([n[2] for n in cg.neurons]),
                                       torch.tensor([n[2] for n in ct.neurons]), rtol=1e-9, atol=1e-12)


def test_fold_final_norm_is_exact_direct_logit_attribution(llava64, images):
    """Folded scores of all neurons sum to the MLPs' direct effect on the logit through the norm."""
    eng = llava64
    n_all = eng.adapter.n_layers * eng.adapter.d_mlp
    res = eng.find(images[:2], fold_final_norm=True, top_k=n_all, **ALL)
    norm = eng.adapter.final_norm
    for img, r in zip(images[:2], res):
        t, _, x, mlp_out = _hooked_full_pass(eng, img, r.output_ids)
        for c in r.concepts:
            pos = t - 1 + c.step
            rms = (x[pos].pow(2).mean() + eng.adapter.norm_eps()).sqrt()
            w_u = eng.adapter.unembed_weight()[c.token_id].double() * norm.weight.double()
            direct = (mlp_out[:, pos] @ w_u).sum() / rms
            total = sum(n[2] for n in c.neurons)
            assert total == pytest.approx(direct.item(), rel=1e-9, abs=1e-12)


def test_image_positions_mean_and_max(llava64, images):
    eng = llava64
    ad = eng.adapter
    n_all = ad.n_layers * ad.d_mlp
    img = images[0]
    mean = eng.find([img], positions="image", reduce="mean", top_k=n_all, **ALL)[0]
    mx = eng.find([img], positions="image", reduce="max", top_k=n_all, **ALL)[0]
    inputs = eng.encode([img], DEFAULT_PROMPT, None)
    image_pos = (inputs["input_ids"][0] == ad.image_token_id).nonzero()[:, 0]
    assert len(image_pos) > 0
    t, hs, _, _ = _hooked_full_pass(eng, img, mean.output_ids)
    for cm, cx in zip(_concepts([mean]), mx.concepts):
        for reduce, c in (("mean", cm), ("max", cx)):
            got = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.float64)
            for layer, index, score in c.neurons:
                got[layer, index] = score
            for layer in range(ad.n_layers):
                prod = hs[layer][image_pos] * _full_projection(eng, layer)[:, c.token_id]  # [P, F]
                want = prod.mean(0) if reduce == "mean" else prod.amax(0)
                torch.testing.assert_close(got[layer], want, rtol=1e-9, atol=1e-12)


def test_grad_baseline_equals_direct_effect_without_final_norm(llava_path, images):
    """With the final norm removed, the last layer's logit is linear in its h: activation x gradient
    must equal the gradient-free score exactly there."""
    import mmn_fast

    eng = mmn_fast.load(llava_path, device="cpu", dtype="float64")
    eng.model.model.language_model.norm = torch.nn.Identity()
    last = eng.adapter.n_layers - 1
    n_all = eng.adapter.n_layers * eng.adapter.d_mlp
    act = eng.find(images[:2], top_k=n_all, **ALL)
    grad = eng.find(images[:2], method="grad", top_k=n_all, **ALL)
    for a, g in zip(act, grad):
        assert a.output_ids == g.output_ids
        for ca, cg in zip(a.concepts, g.concepts):
            sa = {(l, i): s for l, i, s in ca.neurons if l == last}
            sg = {(l, i): s for l, i, s in cg.neurons if l == last}
            keys = sorted(sa)
            torch.testing.assert_close(torch.tensor([sg[k] for k in keys]), torch.tensor([sa[k] for k in keys]),
                                       rtol=1e-9, atol=1e-12)


def test_concept_aggregator_counts_images_not_occurrences():
    """A word named twice in one caption counts once for that image, at its first occurrence (as the
    corpus aggregates do); a neuron's mean score is over the images where it ranked."""
    from mmn_fast.find.results import ConceptResult, ImageResult
    from mmn_fast.run.aggregate import ConceptAggregator

    def image(ident, *concepts):
        return ImageResult(ident, ident, [], [], "", [ConceptResult("red", 5, s, n) for s, n in concepts])

    agg = ConceptAggregator()
    agg.add(image("a", (1, [[0, 1, 2.0], [1, 3, 1.0]]), (4, [[0, 1, 4.0]])))
    agg.add(image("b", (1, [[1, 3, 3.0]])))
    red = agg.summary()["red"]
    assert red["images"] == 2
    by = {(n["layer"], n["index"]): n for n in red["neurons"]}
    assert by[(0, 1)]["count"] == 1 and by[(0, 1)]["mean_score"] == 2.0
    assert by[(1, 3)]["count"] == 2 and by[(1, 3)]["mean_score"] == 2.0
    assert [(n["layer"], n["index"]) for n in red["neurons"]] == [(1, 3), (0, 1)]


def test_projection_cache_follows_in_place_weight_changes(llava64, images):
    """The engine keeps token projections across find calls; an in-place edit of W_out (as a patch
    makes) must not leave stale scores. Doubling a last-layer neuron's output vector changes no
    activation (teacher-forced, same tokens), so exactly its score doubles."""
    eng = llava64
    n_all = eng.adapter.n_layers * eng.adapter.d_mlp
    first = eng.find(images[:1], concepts="all", max_new_tokens=4, top_k=n_all)[0]
    last = eng.adapter.n_layers - 1
    layer, index, score = next(n for n in first.concepts[0].neurons if n[0] == last)
    w = eng.adapter.out_weight(layer)
    saved = w[:, index].clone()
    try:
        with torch.no_grad():
            w[:, index] *= 2
        again = eng.find(images[:1], captions=[first.output_ids], concepts="all", top_k=n_all)[0]
    finally:
        with torch.no_grad():
            w[:, index] = saved
    got = {tuple(n[:2]): n[2] for n in again.concepts[0].neurons}
    assert got[(layer, index)] == pytest.approx(2 * score, rel=1e-9)


def test_projection_columns_do_not_depend_on_the_tokens_computed_with_them(llava):
    """A token's projection column is the same bits whether it was computed alone or among other new
    tokens (a matmul's rounding depends on its shape): otherwise scores would depend on what a run
    scored before, and a resumed or multi-process run would not reproduce a single one."""
    alone = Scorer(llava.adapter).projection([5])[0]  # [L, F]
    for others in ([3, 5], [3, 5, 7, 9, 11], list(range(2, 13))):  # 2, 5 and 11 new tokens (two chunks)
        together = Scorer(llava.adapter).projection(others)
        assert torch.equal(together[others.index(5)], alone), len(others)


def _held_by_this_thread(lock) -> bool:
    """True when another thread cannot take `lock` now (its owner is the caller)."""
    free = []

    def probe():
        got = lock.acquire(blocking=False)
        if got:
            lock.release()
        free.append(got)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return not free[0]


@pytest.mark.parametrize("method", ["act", "grad"])
def test_scoring_holds_the_swap_lock(llava, images, monkeypatch, method):
    """A find batch sees one patch state: a patch applied from another thread must not land between
    generation and scoring, so the scoring (and the grad method's forward) runs under the swap lock."""
    seen = []
    if method == "grad":
        real = engine_module.grad_scores
        monkeypatch.setattr(engine_module, "grad_scores",
                            lambda *a, **k: seen.append(_held_by_this_thread(llava.swap_lock)) or real(*a, **k))
    else:
        real = Scorer.projection
        monkeypatch.setattr(Scorer, "projection",
                            lambda *a, **k: seen.append(_held_by_this_thread(llava.swap_lock)) or real(*a, **k))
    llava.find(images[:2], method=method, top_k=5, batch_size=2, **ALL)
    assert seen and all(seen)
