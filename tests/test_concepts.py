"""Word, token id and decoding step stay aligned, whatever words are dropped."""
import pytest

from mmn_fast.find.concepts import check_word_list, resolve_mode, select_concepts, split_words
from mmn_fast.errors import MMNError
from mmn_fast.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_every_word_points_at_its_first_sub_token(tok):
    text = "a small brown dog sits beside the elephant and a zebra"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    caption, words = split_words(tok, ids)
    assert [w.text for w in words] == caption.split()
    for w in words:
        first = tok.decode(ids[: w.step + 1], skip_special_tokens=True)
        before = tok.decode(ids[: w.step], skip_special_tokens=True)
        assert first[len(before):].strip() and w.text.startswith(first[len(before):].strip())
    steps = [w.step for w in words]
    assert steps == sorted(set(steps))


def test_dropping_words_keeps_alignment(tok):
    """The released code misaligns word and step once a word is skipped; here each kept word keeps
    its own step and token id."""
    ids = tok("the dog and the elephant with a zebra", add_special_tokens=False)["input_ids"]
    caption, words = split_words(tok, ids)
    kept = select_concepts(caption, words, "all")
    assert [w.text for w in kept] == ["dog", "elephant", "zebra"]
    by_text = {w.text: w for w in words}
    for w in kept:
        assert w.step == by_text[w.text].step
        assert tok.decode(ids[w.step: w.step + 1]).strip() == tok.decode(
            tok(" " + w.text, add_special_tokens=False)["input_ids"][:1]).strip()
    picked = select_concepts(caption, words, ["zebra"])
    assert [(w.text, w.step) for w in picked] == [("zebra", by_text["zebra"].step)]


def test_special_tokens_are_not_words(tok):
    ids = tok("a red dog", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    caption, words = split_words(tok, ids)
    assert caption.strip() == "a red dog"
    assert [w.text for w in words] == ["a", "red", "dog"]


def test_word_list_validation(tok):
    assert resolve_mode("red, dog") == ["red", "dog"]
    with pytest.raises(MMNError, match="empty"):
        resolve_mode([" "])
    with pytest.raises(MMNError, match="single word"):
        check_word_list(tok, ["red dog"])


def test_nouns_without_tagger_is_a_clear_error(monkeypatch):
    import mmn_fast.find.concepts as c

    monkeypatch.setattr(c.NounTagger, "available", property(lambda self: False))
    with pytest.raises(MMNError, match="spaCy"):
        c.resolve_mode("nouns")
    with pytest.warns(UserWarning, match="no spaCy English pipeline"):
        assert c.resolve_mode("auto") == "all"


def test_nouns_map_tagger_offsets_to_first_sub_tokens(tok):
    """With a tagger (stubbed here: no English pipeline is installable offline), nouns are picked by
    character offset, so a noun after dropped words keeps its own step."""
    import mmn_fast.find.concepts as c

    class Tok:
        def __init__(self, text, idx, tag):
            self.text, self.idx, self.tag_ = text, idx, tag

    def tagger(text):
        tags = {"dog": "NN", "elephants": "NNS", "zebra": "NN"}
        out, pos = [], 0
        for word in text.split():
            pos = text.index(word, pos)
            out.append(Tok(word, pos, tags.get(word, "DT")))
            pos += len(word)
        return out

    stub = c.NounTagger(pipeline=tagger)
    ids = tok("a brown dog sees two elephants and a zebra", add_special_tokens=False)["input_ids"]
    caption, words = split_words(tok, ids)
    nouns = select_concepts(caption, words, c.resolve_mode("nouns", stub), stub)
    assert [w.text for w in nouns] == ["dog", "elephants", "zebra"]
    for w in nouns:
        assert w.step == next(x.step for x in words if x.text == w.text)
        assert tok.decode(ids[: w.step + 1]).rstrip().endswith(tok.decode(ids[w.step: w.step + 1]).strip())


def test_an_engine_loads_its_tagger_once(monkeypatch):
    """The spaCy pipeline is loaded on first use and kept by its NounTagger (an engine holds one), not
    in a module-level cache."""
    import mmn_fast.find.concepts as c

    loads = []
    monkeypatch.setattr(c, "_load_spacy", lambda names: loads.append(names) or (lambda text: []))
    tagger = c.NounTagger()
    assert not loads
    assert tagger.available and tagger.available and tagger.noun_starts("a dog") == set()
    assert len(loads) == 1
    assert c.NounTagger().available and len(loads) == 2  # another owner loads its own
