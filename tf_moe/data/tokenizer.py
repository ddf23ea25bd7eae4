"""WordPiece tokenisation with TensorFlow Text, usable inside tf.data and SavedModels."""

import math
import os

import tensorflow as tf
import tensorflow_text as tf_text
from tensorflow_text.python.ops.bert_tokenizer import BasicTokenizer
from tensorflow_text.tools.wordpiece_vocab import wordpiece_tokenizer_learner_lib

from tf_moe.data.progress import Progress

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
START_TOKEN = "[START]"
END_TOKEN = "[END]"
# Their positions are their ids: padding is id 0, which the models mask.
RESERVED_TOKENS = (PAD_TOKEN, UNK_TOKEN, START_TOKEN, END_TOKEN)
PAD_ID, UNK_ID, START_ID, END_ID = range(len(RESERVED_TOKENS))


def normalize_words(strings):
    """Case-folds text and separates its words and punctuation by single spaces.

    The word split of `WordpieceTokenizer` (`tf_text.case_fold_utf8`, then
    BERT's whitespace-and-punctuation split), for word-level language
    modelling of raw text: "In the beginning, God" -> "in the beginning , god".

    Args:
        strings: a 1-D string tensor, or a list of strings.

    Returns:
        A 1-D string tensor, or a list of str for a list.
    """
    if isinstance(strings, (list, tuple)):
        if not strings:
            return []
        texts = []
        for start in range(0, len(strings), _NORMALIZE_BATCH):
            batch = normalize_words(tf.constant(list(strings[start : start + _NORMALIZE_BATCH])))
            texts += [text.decode("utf-8") for text in batch.numpy()]
        return texts
    words = BasicTokenizer(lower_case=False).tokenize(tf_text.case_fold_utf8(strings))
    return tf.strings.reduce_join(words, axis=-1, separator=" ")


# Texts normalised per call of the TensorFlow ops.
_NORMALIZE_BATCH = 4096


def learn_vocabulary(texts, vocab_size=8000, batch_size=1024, progress=None):
    """Learns a WordPiece vocabulary from training text.

    The vocabulary of `tensorflow_text`'s `bert_vocab_from_dataset`, learnt
    on case-folded text split on whitespace and punctuation as
    `WordpieceTokenizer` does, in its two steps (counting words, then
    learning the pieces), each reported to `progress`. The result starts
    with `RESERVED_TOKENS` (`[PAD]`=0, `[UNK]`=1, `[START]`=2, `[END]`=3).
    Learning takes about a minute per million words on one CPU.

    Args:
        texts: list of strings, or a `tf.data.Dataset` of scalar strings.
        vocab_size: maximum vocabulary size (the result can be smaller on
            small corpora).
        batch_size: how many texts are pre-tokenised at a time.
        progress: a `tf_moe.data.Progress` that reports the two steps
            (e.g. with progress bars); by default a log line for each.

    Returns:
        The vocabulary as a list of strings; suffix pieces start with `##`.

    Example:

    >>> vocab = learn_vocabulary(["In the beginning", "the end"], 100)
    >>> vocab[:4]
    ['[PAD]', '[UNK]', '[START]', '[END]']
    """
    if vocab_size <= len(RESERVED_TOKENS):
        raise ValueError(
            f"`vocab_size` must be larger than the {len(RESERVED_TOKENS)} "
            f"reserved tokens, got {vocab_size}."
        )
    if isinstance(texts, tf.data.Dataset):
        dataset, batches = texts, None
    else:
        texts = list(texts)
        if not texts:
            raise ValueError("`texts` is empty: cannot learn a vocabulary.")
        dataset, batches = tf.data.Dataset.from_tensor_slices(texts), math.ceil(len(texts) / batch_size)
    progress = progress or Progress()
    words = dataset.batch(batch_size).map(tf_text.case_fold_utf8).map(BasicTokenizer(lower_case=False).tokenize)
    counts = wordpiece_tokenizer_learner_lib.count_words(
        progress.iterate(words, "Counting words", total=batches, unit="batch")
    )
    with progress.busy(f"Learning a vocabulary of up to {vocab_size} wordpieces from {len(counts)} distinct words"):
        return wordpiece_tokenizer_learner_lib.learn(counts, vocab_size, list(RESERVED_TOKENS))


class WordpieceTokenizer(tf.Module):
    """Lower-casing WordPiece tokenizer built from TensorFlow Text ops.

    Text is case-folded (accents are kept), split on whitespace and
    punctuation, then split into WordPiece pieces with
    `tf_text.BertTokenizer` over an in-graph vocabulary lookup table, so the
    tokenizer runs inside `tf.data` pipelines and can be saved in a
    SavedModel (`tf.saved_model.save`) and used there without Python.
    Unknown words map to `[UNK]` (id 1). Ids 0-3 are the reserved tokens
    `[PAD]`, `[UNK]`, `[START]`, `[END]`.

    Args:
        vocabulary: list of tokens (reserved tokens first, as returned by
            `learn_vocabulary`), or the path of a vocabulary file with one
            token per line (as written by `save_vocabulary`).
        name: module name.

    Example:

    >>> texts = ["In the beginning, God created the heavens and the earth."]
    >>> tokenizer = WordpieceTokenizer.from_texts(texts, vocab_size=200)
    >>> ids = tokenizer.tokenize(texts)
    >>> tokenizer.detokenize(ids).numpy()[0]
    b'in the beginning , god created the heavens and the earth .'
    """

    def __init__(self, vocabulary, name=None):
        super().__init__(name=name)
        if isinstance(vocabulary, (str, os.PathLike)):
            with open(vocabulary, encoding="utf-8") as f:
                vocabulary = [line.rstrip("\n") for line in f]
        vocabulary = list(vocabulary)
        if tuple(vocabulary[: len(RESERVED_TOKENS)]) != RESERVED_TOKENS:
            raise ValueError(
                f"`vocabulary` must start with the reserved tokens "
                f"{list(RESERVED_TOKENS)}, got {vocabulary[:len(RESERVED_TOKENS)]}."
            )
        self._vocabulary = vocabulary
        self.vocab = tf.Variable(vocabulary, trainable=False, dtype=tf.string, name="vocab")
        self._table = tf.lookup.StaticVocabularyTable(
            tf.lookup.KeyValueTensorInitializer(
                vocabulary, tf.range(len(vocabulary), dtype=tf.int64)
            ),
            num_oov_buckets=1,
        )
        # Text is case-folded with `tf_text.case_fold_utf8` (lower-casing that
        # keeps accents, which matter in Spanish or French) before it is split
        # on whitespace and punctuation; BERT's `lower_case=True` would also
        # strip the accents. `BasicTokenizer` is that split alone, the one
        # `bert_vocab_from_dataset` uses to learn the vocabulary.
        self._bert = tf_text.BertTokenizer(
            self._table, lower_case=False, unknown_token=UNK_TOKEN
        )

    @classmethod
    def from_texts(cls, texts, vocab_size=8000, name=None, progress=None):
        """Learns a vocabulary from `texts` (see `learn_vocabulary`) and builds a tokenizer."""
        return cls(learn_vocabulary(texts, vocab_size, progress=progress), name=name)

    @classmethod
    def from_translation_pairs(cls, pairs, vocab_size=8000, name=None, progress=None):
        """Builds a tokenizer with one vocabulary shared by both languages of `pairs`.

        Args:
            pairs: list of `(source, target)` strings.
            vocab_size: maximum vocabulary size.
            name: module name.
            progress: a `tf_moe.data.Progress` (see `learn_vocabulary`).

        Returns:
            A `WordpieceTokenizer`.
        """
        pairs = list(pairs)
        texts = [source for source, _ in pairs] + [target for _, target in pairs]
        return cls.from_texts(texts, vocab_size, name=name, progress=progress)

    @property
    def start_id(self):
        """The id every text starts with: `[START]`."""
        return START_ID

    @property
    def vocabulary_size(self):
        """Number of tokens, reserved tokens included."""
        return len(self._vocabulary)

    def get_vocabulary(self):
        """Returns the vocabulary as a list of strings."""
        return list(self._vocabulary)

    def save_vocabulary(self, path):
        """Writes the vocabulary to `path`, one token per line."""
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(token + "\n" for token in self._vocabulary))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def tokenize(self, strings):
        """Tokenizes a batch of strings.

        Args:
            strings: 1-D string tensor.

        Returns:
            An int32 `RaggedTensor` of shape `[batch, (tokens)]`, without
            `[START]`/`[END]` (the pipelines add them where needed).
        """
        pieces = self._bert.tokenize(tf_text.case_fold_utf8(strings))
        # [batch, words, pieces] -> [batch, pieces].
        return tf.cast(pieces.merge_dims(-2, -1), tf.int32)

    def detokenize(self, ids):
        """Turns token ids back into normalised text.

        `[PAD]`, `[START]` and `[END]` ids are dropped; pieces are joined into
        words, and words (punctuation included) are separated by one space,
        which gives back `normalize(text)` for known words.

        Args:
            ids: int `RaggedTensor` or dense tensor (padded with 0) of shape
                `[batch, tokens]`.

        Returns:
            A 1-D string tensor.
        """
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.RaggedTensor.from_tensor(tf.convert_to_tensor(ids))
        return self.detokenize_ragged(tf.cast(ids, tf.int32))

    @tf.function(input_signature=[tf.RaggedTensorSpec([None, None], tf.int32)])
    def detokenize_ragged(self, ids):
        """`detokenize` for an int32 `RaggedTensor`: the form kept in SavedModels."""
        keep = (ids != PAD_ID) & (ids != START_ID) & (ids != END_ID)
        ids = tf.ragged.boolean_mask(ids, keep)
        words = self._bert.detokenize(tf.cast(ids, tf.int64))
        return tf.strings.reduce_join(words, axis=-1, separator=" ")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def normalize(self, strings):
        """Returns the text as the tokenizer sees it.

        Args:
            strings: 1-D string tensor.

        Returns:
            A 1-D string tensor: case-folded, with words and punctuation
            separated by single spaces.
        """
        return normalize_words(strings)

    def id_to_token(self, ids):
        """Maps token ids to their vocabulary strings (suffix pieces keep `##`)."""
        return tf.gather(self.vocab, ids)
