"""Text data for the MoE experiments: corpora, WordPiece tokenisation, tf.data pipelines."""

from tf_moe.data.corpora import (
    SPLITS,
    TEST_BOOKS,
    WORD_TOKENIZED_CORPORA,
    VALID_BOOKS,
    CorpusError,
    CorpusUnavailableError,
    Verse,
    available_corpora,
    bible_source,
    clean_osis,
    default_cache_dir,
    load_lm_corpus,
    load_translation_pairs,
    load_verses,
    split_of_book,
)
from tf_moe.data.pipelines import lm_dataset, lm_stream_dataset, translation_dataset
from tf_moe.data.tfds_loaders import load_lm1b, load_wmt14_pairs
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
from tf_moe.data.vocabulary import WordVocabulary

__all__ = [
    "CorpusError",
    "CorpusUnavailableError",
    "END_ID",
    "PAD_ID",
    "RESERVED_TOKENS",
    "SPLITS",
    "START_ID",
    "TEST_BOOKS",
    "UNK_ID",
    "WORD_TOKENIZED_CORPORA",
    "VALID_BOOKS",
    "Verse",
    "WordVocabulary",
    "WordpieceTokenizer",
    "available_corpora",
    "bible_source",
    "clean_osis",
    "default_cache_dir",
    "learn_vocabulary",
    "normalize_words",
    "lm_dataset",
    "lm_stream_dataset",
    "load_lm1b",
    "load_lm_corpus",
    "load_translation_pairs",
    "load_verses",
    "load_wmt14_pairs",
    "split_of_book",
    "translation_dataset",
]
