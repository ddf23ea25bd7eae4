"""Tests of the word-level vocabulary (PTB protocol)."""

import numpy as np
import pytest

from tf_moe.data import PAD_ID, WordVocabulary


def test_words_ranked_by_frequency_with_eos_after_every_sentence():
    texts = ["the cat sat", "the dog", "a cat"]
    vocab = WordVocabulary.from_texts(texts)
    # the:2 cat:2 <eos>:3, then singletons alphabetically, <unk> (0) last.
    assert vocab.get_vocabulary() == ["[PAD]", "<eos>", "cat", "the", "a", "dog", "sat", "<unk>"]
    ids = vocab.encode(["the cat", "zebra"])
    assert ids.dtype == np.int32
    assert ids.tolist() == [3, 2, 1, 7, 1]
    assert vocab.decode(ids) == "the cat <eos> <unk> <eos>"
    assert PAD_ID not in ids


def test_max_size_keeps_the_most_frequent_words_and_both_specials():
    vocab = WordVocabulary.from_texts(["a a a b b c"], max_size=3)
    assert vocab.get_vocabulary() == ["[PAD]", "a", "<eos>", "<unk>"]
    assert vocab.encode(["b a"]).tolist() == [3, 1, 2]


def test_ptb_style_text_keeps_its_own_unk():
    vocab = WordVocabulary.from_texts(["<unk> said the <unk>"])
    assert vocab.encode(["<unk> said"]).tolist()[:2] == [
        vocab.get_vocabulary().index("<unk>"),
        vocab.get_vocabulary().index("said"),
    ]


def test_save_and_load_round_trip(tmp_path):
    vocab = WordVocabulary.from_texts(["x y z", "y"])
    path = tmp_path / "vocab.txt"
    vocab.save_vocabulary(str(path))
    loaded = WordVocabulary.load(str(path))
    assert loaded.get_vocabulary() == vocab.get_vocabulary()
    np.testing.assert_array_equal(loaded.encode(["z y q"]), vocab.encode(["z y q"]))


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="texts"):
        WordVocabulary.from_texts([])
    with pytest.raises(ValueError, match="max_size"):
        WordVocabulary.from_texts(["a"], max_size=1)
    with pytest.raises(ValueError, match="<eos>"):
        WordVocabulary(["a", "<unk>"])
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ValueError, match="bad.txt"):
        WordVocabulary.load(str(bad))
