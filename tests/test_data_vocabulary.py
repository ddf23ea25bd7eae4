"""Tests of the word-level vocabulary (PTB protocol)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_moe.data import PAD_ID, WordVocabulary, load_vocabulary


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


@pytest.mark.parametrize("normalize", [False, True])
def test_save_and_load_round_trip(tmp_path, normalize):
    vocab = WordVocabulary.from_texts(["x y z", "y"], normalize=normalize)
    path = tmp_path / "vocab.json"
    vocab.save_vocabulary(str(path))
    for loaded in (WordVocabulary.load(str(path)), load_vocabulary(str(path))):
        assert isinstance(loaded, WordVocabulary) and loaded.normalize == normalize
        assert loaded.get_vocabulary() == vocab.get_vocabulary()
        np.testing.assert_array_equal(loaded.encode(["z y q"]), vocab.encode(["z y q"]))


def test_normalized_vocabulary_case_folds_and_splits_punctuation():
    vocab = WordVocabulary.from_texts(["In the beginning, God", "God said."], normalize=True)
    assert "god" in vocab.get_vocabulary() and "God" not in vocab.get_vocabulary()
    assert vocab.decode(vocab.encode(["GOD said, Amen."])) == "god said , <unk> . <eos>"


@pytest.mark.parametrize("normalize", [False, True])
def test_in_graph_tokenize_matches_encode(normalize):
    vocab = WordVocabulary.from_texts(["the cat sat .", "a dog , the end"], normalize=normalize)
    texts = ["the cat , sat", "", "  ", "zebra the"]
    ragged = tf.function(vocab.tokenize)(tf.constant(texts))
    assert ragged.dtype == tf.int32
    for row, text in zip(ragged.to_list(), texts):
        assert row == vocab.encode([text]).tolist()[:-1]  # encode ends with <eos>
    assert vocab.start_id == vocab.eos_id == vocab.get_vocabulary().index("<eos>")


def test_load_vocabulary_reads_a_wordpiece_vocabulary_too(tmp_path):
    from tf_moe.data import RESERVED_TOKENS, WordpieceTokenizer

    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(list(RESERVED_TOKENS) + ["a", "b"]) + "\n")
    assert isinstance(load_vocabulary(str(path)), WordpieceTokenizer)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="texts"):
        WordVocabulary.from_texts([])
    with pytest.raises(ValueError, match="max_size"):
        WordVocabulary.from_texts(["a"], max_size=1)
    with pytest.raises(ValueError, match="<eos>"):
        WordVocabulary(["a", "<unk>"])
    for content in ("a\nb\n", '{"format": "other"}', "{"):
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(ValueError, match="bad.json is not a WordVocabulary file"):
            WordVocabulary.load(str(bad))
