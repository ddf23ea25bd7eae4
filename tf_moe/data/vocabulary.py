"""Word-level vocabularies for the standard language-modelling benchmarks."""

import collections
import json
import os

import numpy as np
import tensorflow as tf

from tf_moe.data.tokenizer import PAD_ID, PAD_TOKEN, WordpieceTokenizer, normalize_words

EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
# `"format"` of the JSON files that `WordVocabulary.save_vocabulary` writes.
_FILE_FORMAT = "tf_moe.WordVocabulary"


class WordVocabulary(tf.Module):
    """A word-level vocabulary with `<eos>` after every sentence.

    The protocol of the Penn Treebank language-modelling benchmark (Mikolov
    et al. 2010, used by TensorFlow's PTB tutorial): words are split on
    whitespace, every sentence ends with `<eos>`, and words outside the
    vocabulary become `<unk>`. Id 0 is `[PAD]`, which the models mask, so a
    vocabulary of V words has `vocabulary_size == V + 1` ids; PTB's training
    text has exactly 10,000 word types with `<eos>` (it already spells rare
    words `<unk>`). With `normalize=True` raw text is first case-folded and
    its punctuation split off (`normalize_words`, as the wordpiece tokenizer
    does), for corpora that do not come tokenised.

    Texts become ids in Python (`encode`, for the training stream) or in a
    TensorFlow graph (`tokenize`, for a served model), the same way.

    Args:
        words: the vocabulary's words, most frequent first; must include
            `<eos>` and `<unk>`.
        normalize: whether texts are normalised before they are split.
        name: module name.

    Example:

    >>> vocab = WordVocabulary.from_texts(["a b a", "b c"])
    >>> vocab.get_vocabulary()
    ['[PAD]', '<eos>', 'a', 'b', 'c', '<unk>']
    >>> vocab.encode(["a c d"]).tolist()  # d is unknown
    [2, 4, 5, 1]
    """

    def __init__(self, words, normalize=False, name=None):
        super().__init__(name=name)
        words = list(words)
        for required in (EOS_TOKEN, UNK_TOKEN):
            if required not in words:
                raise ValueError(f"`words` must include {required!r}.")
        if len(set(words)) != len(words) or PAD_TOKEN in words:
            raise ValueError(f"`words` must be distinct and must not include {PAD_TOKEN!r}.")
        self.normalize = bool(normalize)
        self._tokens = [PAD_TOKEN] + words
        self._ids = {word: i for i, word in enumerate(self._tokens)}
        # Tracked as module state, so an exported model carries its vocabulary.
        self.vocab = tf.Variable(self._tokens, trainable=False, dtype=tf.string, name="vocab")
        self._table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(self._tokens, tf.range(len(self._tokens), dtype=tf.int64)),
            default_value=self._ids[UNK_TOKEN],
        )

    @classmethod
    def from_texts(cls, texts, max_size=None, normalize=False):
        """The `max_size` most frequent words of `texts` (all by default).

        Ties are broken alphabetically, so the vocabulary is deterministic.
        `<eos>` and `<unk>` are always included and count in `max_size`.
        """
        if max_size is not None and (not isinstance(max_size, int) or max_size < 2):
            raise ValueError(f"`max_size` must be an int >= 2 (<eos> and <unk>), got {max_size!r}.")
        texts = list(texts)
        if not texts:
            raise ValueError("`texts` is empty: cannot build a vocabulary.")
        if normalize:
            texts = normalize_words(texts)
        counts = collections.Counter()
        for text in texts:
            counts.update(text.split())
        counts[EOS_TOKEN] = len(texts)
        counts.setdefault(UNK_TOKEN, 0)
        ranked = sorted(counts, key=lambda word: (-counts[word], word))
        specials = (EOS_TOKEN, UNK_TOKEN)
        words = [word for word in ranked if word not in specials]
        if max_size is not None:
            words = words[: max_size - len(specials)]
        kept = set(words).union(specials)
        return cls((word for word in ranked if word in kept), normalize=normalize)

    @classmethod
    def load(cls, path):
        """Reads a vocabulary written by `save_vocabulary`."""
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("format") != _FILE_FORMAT or saved["tokens"][0] != PAD_TOKEN:
                raise ValueError
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise ValueError(
                f"{path} is not a WordVocabulary file (JSON with \"format\": \"{_FILE_FORMAT}\")."
            ) from None
        return cls(saved["tokens"][1:], normalize=saved["normalize"])

    @property
    def vocabulary_size(self):
        """Number of ids, `[PAD]` included."""
        return len(self._tokens)

    @property
    def eos_id(self):
        return self._ids[EOS_TOKEN]

    @property
    def start_id(self):
        """The id a text starts after: `<eos>`, the end of the sentence before."""
        return self.eos_id

    def get_vocabulary(self):
        return list(self._tokens)

    def save_vocabulary(self, path):
        """Writes the tokens (in id order) and `normalize` as JSON."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"format": _FILE_FORMAT, "normalize": self.normalize, "tokens": self._tokens},
                      f, ensure_ascii=False, indent=0)

    def encode(self, texts):
        """All sentences as one stream of ids, each followed by `<eos>`.

        Returns:
            int32 numpy array.
        """
        texts = list(texts)
        if self.normalize:
            texts = normalize_words(texts)
        unk, eos = self._ids[UNK_TOKEN], self._ids[EOS_TOKEN]
        ids = []
        for text in texts:
            ids.extend(self._ids.get(word, unk) for word in text.split())
            ids.append(eos)
        return np.asarray(ids, np.int32)

    def tokenize(self, strings):
        """In-graph `encode` of each text alone, without its `<eos>`.

        Args:
            strings: 1-D string tensor.

        Returns:
            int32 `RaggedTensor` [batch, (words)].
        """
        strings = tf.convert_to_tensor(strings, tf.string)
        if self.normalize:
            strings = normalize_words(strings)
        words = tf.strings.split(strings)
        return tf.cast(tf.ragged.map_flat_values(self._table.lookup, words), tf.int32)

    def decode(self, ids):
        """Ids back to space-separated words (padding dropped)."""
        return " ".join(self._tokens[i] for i in np.asarray(ids).reshape(-1) if i != PAD_ID)


def load_vocabulary(path):
    """The vocabulary a model was trained with: a `WordVocabulary` or a `WordpieceTokenizer`.

    `WordVocabulary.save_vocabulary` writes JSON; a `WordpieceTokenizer`
    vocabulary is a text file of one token per line.
    """
    with open(path, encoding="utf-8") as f:
        start = f.read(1)
    if start == "{":
        return WordVocabulary.load(path)
    return WordpieceTokenizer(path)
