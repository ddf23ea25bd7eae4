"""Tests of the WordPiece tokenizer (learning, round trip, unknown words, SavedModel)."""

import contextlib
import functools
import logging

import pytest
import tensorflow as tf

from tf_moe import data
from tf_moe.reproduction import corpora

# Learning on a slice of the corpus keeps the tests fast (vocabulary learning
# is pure Python: seconds for a thousand verses).
_NUM_PAIRS = 500


@functools.lru_cache(maxsize=None)
def learn_test_tokenizer():
    """Returns the English-Spanish tokenizer of the data tests, learned once per session."""
    pairs = corpora.load_translation_pairs("web-sparv", "train")[:_NUM_PAIRS]
    return data.WordpieceTokenizer.from_translation_pairs(pairs, vocab_size=1000)


@pytest.fixture(scope="session")
def training_texts():
    pairs = corpora.load_translation_pairs("web-sparv", "train")[:_NUM_PAIRS]
    return [source for source, _ in pairs] + [target for _, target in pairs]


@pytest.fixture(scope="session")
def tokenizer():
    return learn_test_tokenizer()


def _decode(strings):
    return [s.decode("utf-8") for s in strings.numpy()]


def test_reserved_tokens_come_first(tokenizer):
    vocab = tokenizer.get_vocabulary()
    assert vocab[:4] == ["[PAD]", "[UNK]", "[START]", "[END]"]
    assert (data.PAD_ID, data.UNK_ID, data.START_ID, data.END_ID) == (0, 1, 2, 3)
    assert 500 < tokenizer.vocabulary_size <= 1000
    assert any(token.startswith("##") for token in vocab)


def test_vocabulary_is_that_of_bert_vocab_from_dataset(training_texts):
    # learn_vocabulary runs tensorflow_text's two steps itself (for its
    # progress bars): the result must be the one-call function's.
    import tensorflow_text as tf_text
    from tensorflow_text.tools.wordpiece_vocab.bert_vocab_from_dataset import bert_vocab_from_dataset

    texts = training_texts[:600]
    reference = bert_vocab_from_dataset(
        tf.data.Dataset.from_tensor_slices(texts).batch(256).map(tf_text.case_fold_utf8),
        vocab_size=400,
        reserved_tokens=list(data.RESERVED_TOKENS),
        bert_tokenizer_params={"lower_case": False},
    )
    assert data.learn_vocabulary(texts, 400, batch_size=100) == reference
    assert data.learn_vocabulary(tf.data.Dataset.from_tensor_slices(texts), 400) == reference


def test_learning_reports_its_two_steps_to_progress(training_texts, caplog):
    class Recorded(data.Progress):
        def __init__(self):
            self.steps = []

        def iterate(self, iterable, desc, total=None, unit="it"):
            self.steps.append((desc, total, unit))
            return iterable

        def busy(self, desc):
            self.steps.append(desc)
            return contextlib.nullcontext()

    texts = training_texts[:250]
    recorded = Recorded()
    with caplog.at_level(logging.INFO, logger="tf_moe.data"):
        vocab = data.WordpieceTokenizer.from_texts(texts, 300, progress=recorded).get_vocabulary()
        assert not caplog.records
        assert vocab == data.learn_vocabulary(texts, 300)
    counting, learning = recorded.steps
    assert counting == ("Counting words", 1, "batch")
    assert learning.startswith("Learning a vocabulary of up to 300 wordpieces from ")
    # Without a `progress`, each step is a log line.
    assert [record.getMessage() for record in caplog.records][-2:] == ["Counting words", learning]


def test_normalize_lower_cases_and_splits_punctuation(tokenizer):
    text = "In the beginning, God created the heavens and the earth."
    assert _decode(tokenizer.normalize([text])) == [
        "in the beginning , god created the heavens and the earth ."
    ]


def test_round_trip_gives_normalised_text(tokenizer, training_texts):
    texts = training_texts[::3]
    ids = tokenizer.tokenize(texts)
    assert isinstance(ids, tf.RaggedTensor) and ids.dtype == tf.int32
    assert ids.shape[0] == len(texts)
    # Every character of the training text is in the vocabulary: no [UNK].
    assert not tf.reduce_any(ids.flat_values == data.UNK_ID)
    assert not tf.reduce_any(ids.flat_values < len(data.RESERVED_TOKENS))
    assert _decode(tokenizer.detokenize(ids)) == _decode(tokenizer.normalize(texts))


def test_words_split_into_known_pieces(tokenizer):
    ids = tokenizer.tokenize(["Unbelievably"])
    pieces = [p.decode() for p in tokenizer.id_to_token(ids[0]).numpy()]
    assert len(pieces) > 1 and all(p.startswith("##") for p in pieces[1:])
    assert _decode(tokenizer.detokenize(ids)) == ["unbelievably"]


def test_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer.tokenize(["God λόγος created", ""])
    assert data.UNK_ID in ids[0].numpy().tolist()
    assert ids[1].shape == (0,)
    assert _decode(tokenizer.detokenize(ids)) == ["god [UNK] created", ""]


def test_detokenize_drops_padding_and_markers(tokenizer):
    ids = tokenizer.tokenize(["the earth"]).to_tensor()
    marked = tf.concat(
        [[[data.START_ID]], ids, [[data.END_ID, data.PAD_ID, data.PAD_ID]]], axis=1
    )
    assert _decode(tokenizer.detokenize(marked)) == ["the earth"]


def test_shared_vocabulary_keeps_accents(tokenizer):
    texts = ["In the beginning, God created.", "EN el principio crió Dios los cielos."]
    ids = tokenizer.tokenize(texts)
    assert not tf.reduce_any(ids.flat_values == data.UNK_ID)
    assert _decode(tokenizer.detokenize(ids)) == [
        "in the beginning , god created .",
        "en el principio crió dios los cielos .",
    ]


def test_vocabulary_file_round_trip(tokenizer, tmp_path):
    path = tmp_path / "vocab.txt"
    tokenizer.save_vocabulary(path)
    reloaded = data.WordpieceTokenizer(str(path))
    assert reloaded.get_vocabulary() == tokenizer.get_vocabulary()
    texts = ["And God said, “Let there be light,” and there was light."]
    assert tokenizer.tokenize(texts).to_list() == reloaded.tokenize(texts).to_list()


def test_tokenize_inside_tf_data(tokenizer):
    dataset = tf.data.Dataset.from_tensor_slices(["the earth", "the heavens"])
    dataset = dataset.batch(2).map(tokenizer.tokenize)
    batch = next(iter(dataset))
    assert batch.to_list() == tokenizer.tokenize(["the earth", "the heavens"]).to_list()


def test_saved_model_round_trip(tokenizer, tmp_path):
    tf.saved_model.save(tokenizer, str(tmp_path))
    loaded = tf.saved_model.load(str(tmp_path))
    texts = ["The earth was formless and empty."]
    ids = loaded.tokenize(tf.constant(texts))
    assert ids.to_list() == tokenizer.tokenize(texts).to_list()
    assert _decode(loaded.detokenize_ragged(ids)) == ["the earth was formless and empty ."]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="reserved tokens"):
        data.WordpieceTokenizer(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="`vocab_size`"):
        data.learn_vocabulary(["some text"], vocab_size=4)
    with pytest.raises(ValueError, match="`texts` is empty"):
        data.learn_vocabulary([], vocab_size=100)


def test_normalize_words_case_folds_and_splits_punctuation():
    from tf_moe.data import normalize_words

    texts = ["In the beginning, God created.", "Él dijo: «¡Hola!»", ""]
    expected = ["in the beginning , god created .", "él dijo : « ¡ hola ! »", ""]
    assert normalize_words(texts) == expected
    tensor = normalize_words(tf.constant(texts))
    assert [t.decode("utf-8") for t in tensor.numpy()] == expected
    assert normalize_words([]) == []
