"""Word-level vocabularies for the standard language-modelling benchmarks."""

import collections
import os

import numpy as np

from tf_moe.data.tokenizer import PAD_ID, PAD_TOKEN

EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"


class WordVocabulary:
    """A word-level vocabulary with `<eos>` after every sentence.

    The protocol of the Penn Treebank language-modelling benchmark (Mikolov
    et al. 2010, used by TensorFlow's PTB tutorial): words are split on
    whitespace, every sentence ends with `<eos>`, and words outside the
    vocabulary become `<unk>`. Id 0 is `[PAD]`, which the models mask, so a
    vocabulary of V words has `vocabulary_size == V + 1` ids; PTB's training
    text has exactly 10,000 word types with `<eos>` (it already spells rare
    words `<unk>`).

    Args:
        words: the vocabulary's words, most frequent first; must include
            `<eos>` and `<unk>`.

    Example:

    >>> vocab = WordVocabulary.from_texts(["a b a", "b c"])
    >>> vocab.get_vocabulary()
    ['[PAD]', '<eos>', 'a', 'b', 'c', '<unk>']
    >>> vocab.encode(["a c d"]).tolist()  # d is unknown
    [2, 4, 5, 1]
    """

    def __init__(self, words):
        words = list(words)
        for required in (EOS_TOKEN, UNK_TOKEN):
            if required not in words:
                raise ValueError(f"`words` must include {required!r}.")
        if len(set(words)) != len(words) or PAD_TOKEN in words:
            raise ValueError(f"`words` must be distinct and must not include {PAD_TOKEN!r}.")
        self._tokens = [PAD_TOKEN] + words
        self._ids = {word: i for i, word in enumerate(self._tokens)}

    @classmethod
    def from_texts(cls, texts, max_size=None):
        """The `max_size` most frequent words of `texts` (all by default).

        Ties are broken alphabetically, so the vocabulary is deterministic.
        `<eos>` and `<unk>` are always included and count in `max_size`.
        """
        if max_size is not None and (not isinstance(max_size, int) or max_size < 2):
            raise ValueError(f"`max_size` must be an int >= 2 (<eos> and <unk>), got {max_size!r}.")
        counts = collections.Counter()
        sentences = 0
        for text in texts:
            counts.update(text.split())
            sentences += 1
        if not sentences:
            raise ValueError("`texts` is empty: cannot build a vocabulary.")
        counts[EOS_TOKEN] = sentences
        counts.setdefault(UNK_TOKEN, 0)
        ranked = sorted(counts, key=lambda word: (-counts[word], word))
        specials = (EOS_TOKEN, UNK_TOKEN)
        words = [word for word in ranked if word not in specials]
        if max_size is not None:
            words = words[: max_size - len(specials)]
        kept = set(words).union(specials)
        return cls(word for word in ranked if word in kept)

    @classmethod
    def load(cls, path):
        """Reads a vocabulary written by `save_vocabulary`."""
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        if not tokens or tokens[0] != PAD_TOKEN:
            raise ValueError(f"{path} is not a WordVocabulary file (its first line must be {PAD_TOKEN}).")
        return cls(tokens[1:])

    @property
    def vocabulary_size(self):
        """Number of ids, `[PAD]` included."""
        return len(self._tokens)

    @property
    def eos_id(self):
        return self._ids[EOS_TOKEN]

    def get_vocabulary(self):
        return list(self._tokens)

    def save_vocabulary(self, path):
        """Writes one token per line, in id order."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self._tokens) + "\n")

    def encode(self, texts):
        """All sentences as one stream of ids, each followed by `<eos>`.

        Returns:
            int32 numpy array.
        """
        unk, eos = self._ids[UNK_TOKEN], self._ids[EOS_TOKEN]
        ids = []
        for text in texts:
            ids.extend(self._ids.get(word, unk) for word in text.split())
            ids.append(eos)
        return np.asarray(ids, np.int32)

    def decode(self, ids):
        """Ids back to space-separated words (padding dropped)."""
        return " ".join(self._tokens[i] for i in np.asarray(ids).reshape(-1) if i != PAD_ID)
