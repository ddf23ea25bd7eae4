"""Text data for the models: WordPiece tokenisation, word vocabularies, tf.data pipelines.

The corpora the paper's reproduction trains on are in `tf_moe.reproduction.corpora`.
"""

from tf_moe.data.pipelines import lm_dataset, lm_stream_dataset, translation_dataset
from tf_moe.data.progress import Progress
from tf_moe.data.tokenizer import (
    END_ID,
    PAD_ID,
    RESERVED_TOKENS,
    START_ID,
    UNK_ID,
    WordpieceTokenizer,
    learn_vocabulary,
    normalize_words,
)
from tf_moe.data.vocabulary import WordVocabulary, load_vocabulary

__all__ = [
    "END_ID",
    "PAD_ID",
    "Progress",
    "RESERVED_TOKENS",
    "START_ID",
    "UNK_ID",
    "WordVocabulary",
    "WordpieceTokenizer",
    "learn_vocabulary",
    "normalize_words",
    "lm_dataset",
    "lm_stream_dataset",
    "load_vocabulary",
    "translation_dataset",
]
