"""Inputs that used to be silently wrong or end in a traceback: a tokenizer given as the processor,
prompts without image tokens, one image instead of a list, devices this machine lacks, k out of range."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor

import mmn_fast
from mmn_fast.find.capture import CaptureStore
from mmn_fast.errors import MMNError
from mmn_fast.find.vocab import top_tokens, vocab_table


def test_tokenizer_as_processor_still_gets_the_checkpoints_images(mplug_path, images):
    default = mmn_fast.load(mplug_path, device="cpu")
    with_tok = mmn_fast.load(mplug_path, processor=default.tokenizer, device="cpu")
    assert with_tok.prompter.image_processor is not None
    kw = dict(concepts="all", max_new_tokens=6, top_k=5)
    assert [r.caption for r in with_tok.find(images[:2], **kw)] == [r.caption for r in default.find(images[:2], **kw)]


def test_no_image_processor_is_an_error_not_a_text_only_caption(mplug_path, images):
    eng = mmn_fast.load(mplug_path, device="cpu")
    eng.prompter.image_processor = None
    with pytest.raises(MMNError, match="no image processor"):
        eng.find(images[:1], max_new_tokens=2)
    eng = mmn_fast.load(mplug_path, device="cpu")
    eng.prompter.n_image_tokens = None
    with pytest.raises(MMNError, match="holds no <image> tokens"):
        eng.find(images[:1], max_new_tokens=2)


def test_image_stats_refuse_a_sample_without_image_positions():
    store = CaptureStore(2)
    for layer in range(2):
        store.image[layer] = {"sum": torch.zeros(2, 3), "count": torch.tensor([4, 0])}
    with pytest.raises(MMNError, match="holds no image tokens"):
        store.image_stats()


def test_one_image_instead_of_a_list(llava, images, tmp_path):
    path = tmp_path / "one.png"
    images[0].save(path)
    kw = dict(concepts="all", max_new_tokens=4, top_k=3)
    want = llava.find([images[0]], **kw)[0].caption
    assert llava.find(images[0], **kw)[0].caption == want
    assert llava.find(str(path), **kw)[0].caption == want
    assert llava.find(path, **kw)[0].caption == want
    with pytest.raises(MMNError, match="images must be a list"):
        llava.find(42, **kw)


@pytest.mark.parametrize("device", ["bogus", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_devices_this_machine_lacks(llava_path, device):
    with pytest.raises(MMNError, match="device"):
        mmn_fast.load(llava_path, device=device)


@pytest.mark.parametrize("k", [0, -1, 10**9, 2.5])
def test_k_out_of_range(llava, k, tmp_path):
    with pytest.raises(MMNError, match="k must be"):
        top_tokens(llava, 0, 0, k=k)
    with pytest.raises(MMNError, match="k must be"):
        vocab_table(llava, k=k, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing cached for a bad k


def test_a_template_that_writes_the_image_tokens_itself(mplug_path, images):
    eng = mmn_fast.load(mplug_path, device="cpu")
    want = [r.caption for r in eng.find(images[:2], concepts="all", max_new_tokens=4, top_k=3)]
    n = eng.prompter.n_image_tokens
    eng.prompter.n_image_tokens = None  # no count: the template below holds the tokens
    eng.prompter.template = "<image>" * n + "{image}\n{prompt}"
    assert [r.caption for r in eng.find(images[:2], concepts="all", max_new_tokens=4, top_k=3)] == want


def test_numpy_integers_are_whole_numbers(llava):
    import numpy as np

    assert len(top_tokens(llava, 0, 0, k=np.int64(3))) == 3


def test_load_leaves_the_callers_tokenizer_as_it_was(llava, llava_path, images):
    """The prompter pads on the left with a pad token through its own copy: the caller's tokenizer
    keeps its padding side and its (missing) pad token, and find gives the same results."""
    proc = AutoProcessor.from_pretrained(llava_path)
    proc.tokenizer.padding_side = "right"
    proc.tokenizer.pad_token = None
    eng = mmn_fast.load(llava_path, processor=proc, device="cpu")
    assert proc.tokenizer.padding_side == "right" and proc.tokenizer.pad_token_id is None
    assert eng.tokenizer is proc.tokenizer and eng.prompter.tokenizer is not proc.tokenizer
    assert eng.prompter.tokenizer.padding_side == "left" and eng.prompter.processor.tokenizer is eng.prompter.tokenizer
    assert eng.prompter.pad_token_id == proc.tokenizer.eos_token_id
    kw = dict(concepts="all", max_new_tokens=4, top_k=3, batch_size=2)
    got, want = eng.find(images[:2], **kw), llava.find(images[:2], **kw)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    caps = [r.output_ids for r in want]
    got, want = eng.find(images[:2], captions=caps, **kw), llava.find(images[:2], captions=caps, **kw)
    assert [[c.neurons for c in r.concepts] for r in got] == [[c.neurons for c in r.concepts] for r in want]
