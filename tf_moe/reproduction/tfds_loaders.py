"""Loaders for the paper's datasets through TensorFlow Datasets.

The paper trains its language models on the One Billion Word benchmark
(`lm1b`) and its translation models on WMT'14 English->French and
English->German (`wmt14_translate`). These loaders return the same kinds of
data as `tf_moe.reproduction.corpora` (strings, or `(source, target)` string pairs)
as `tf.data.Dataset`s, ready for `lm_dataset` / `translation_dataset`.

They need `tensorflow-datasets` (`pip install tf_moe[datasets]`) and, the
first time, internet access to download and prepare the data (several GB)
into `data_dir` (default `~/tensorflow_datasets`).
"""

_LM1B_SPLITS = {"train": "train", "test": "test"}
_WMT14_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
_WMT14_LANGUAGES = ("fr", "de")


def load_lm1b(split="train", data_dir=None, download=True):
    """Loads the One Billion Word benchmark as a dataset of sentences.

    Args:
        split: `"train"` or `"test"` (the benchmark's held-out set; `lm1b`
            has no separate validation split).
        data_dir: TensorFlow Datasets data directory.
        download: whether to download and prepare the data if missing.

    Returns:
        A `tf.data.Dataset` of scalar strings, one sentence each.

    Example:

    >>> sentences = load_lm1b("test")
    >>> ds = lm_dataset(sentences, tokenizer, seq_len=64, batch_size=32)
    """
    if split not in _LM1B_SPLITS:
        raise ValueError(
            f"Unknown `split`={split!r} for lm1b. Expected one of {list(_LM1B_SPLITS)}."
        )
    tfds = _import_tfds()
    dataset = tfds.load(
        "lm1b", split=_LM1B_SPLITS[split], data_dir=data_dir, download=download
    )
    return dataset.map(lambda example: example["text"])


def load_wmt14_pairs(language_pair="en-fr", split="train", data_dir=None, download=True):
    """Loads WMT'14 translation pairs.

    Args:
        language_pair: `"source-target"`: `"en-fr"` or `"en-de"` (the paper's
            directions), or `"fr-en"` / `"de-en"`.
        split: `"train"`, `"valid"` (newstest2013) or `"test"` (newstest2014).
        data_dir: TensorFlow Datasets data directory.
        download: whether to download and prepare the data if missing.

    Returns:
        A `tf.data.Dataset` of `(source, target)` scalar strings.

    Example:

    >>> pairs = load_wmt14_pairs("en-de", "valid")
    >>> ds = translation_dataset(pairs, tokenizer, max_len=64, batch_size=32)
    """
    pairs = [f"en-{lang}" for lang in _WMT14_LANGUAGES]
    pairs += [f"{lang}-en" for lang in _WMT14_LANGUAGES]
    if language_pair not in pairs:
        raise ValueError(
            f"Unknown `language_pair`={language_pair!r}. Expected one of {pairs}."
        )
    if split not in _WMT14_SPLITS:
        raise ValueError(
            f"Unknown `split`={split!r} for WMT'14. Expected one of {list(_WMT14_SPLITS)}."
        )
    source, target = language_pair.split("-")
    other = target if source == "en" else source
    tfds = _import_tfds()
    dataset = tfds.load(
        f"wmt14_translate/{other}-en",
        split=_WMT14_SPLITS[split],
        data_dir=data_dir,
        download=download,
    )
    return dataset.map(lambda example: (example[source], example[target]))


def _import_tfds():
    try:
        import tensorflow_datasets
    except ImportError as e:
        raise ImportError(
            "The lm1b / WMT'14 loaders need `tensorflow-datasets`: "
            "`pip install tf_moe[datasets]` or `pip install tensorflow-datasets`."
        ) from e
    return tensorflow_datasets
