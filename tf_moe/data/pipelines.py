"""tf.data input pipelines for language modelling and translation.

All batches hold int32 token ids padded with id 0 (`[PAD]`). Padding is
ignored by the models: a target id of 0 is padding and contributes nothing
to the loss or the metrics (mask with `targets != 0`).

Two batching modes:

* length bucketing (default): sequences of similar length are batched
  together with `tf.data.Dataset.bucket_by_sequence_length` and padded to the
  longest one of their batch, which wastes little computation on padding.
  Shapes vary from batch to batch (`[None, None]`).
* fixed length (`fixed_length=True`): every batch is padded to the maximum
  length and incomplete batches are dropped, so shapes are static
  (`[batch_size, seq_len]`), as XLA compilation and TPUs need.
"""

import tensorflow as tf

from tf_moe.data.tokenizer import END_ID, PAD_ID, START_ID

# Tokenising many texts per call is much faster than one at a time.
_TOKENIZE_BATCH = 256
_DEFAULT_BOUNDARIES = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def lm_dataset(
    texts,
    tokenizer,
    seq_len,
    batch_size,
    shuffle=True,
    seed=None,
    fixed_length=False,
    bucket_boundaries=None,
):
    """Builds a next-token prediction dataset.

    Each text becomes `[START] tokens [END]`, truncated to `seq_len + 1` ids;
    `inputs` are all ids but the last and `targets` all ids but the first, so
    `targets[t] == inputs[t + 1]`. Both are padded with 0; a target of 0 is
    padding, to be ignored by the loss.

    Args:
        texts: list of strings, or a `tf.data.Dataset` of scalar strings.
        tokenizer: a `WordpieceTokenizer` (anything with a `tokenize` method
            mapping a 1-D string tensor to ragged int ids).
        seq_len: maximum number of ids in `inputs` (and `targets`).
        batch_size: number of sequences per batch.
        shuffle: whether to shuffle the texts (again at every epoch).
        seed: shuffling seed, for a reproducible order.
        fixed_length: `True` pads every batch to `seq_len` and drops the last
            incomplete batch (static shapes for XLA/TPU); `False` uses length
            bucketing.
        bucket_boundaries: increasing sequence lengths separating the
            buckets; by default a fixed set of lengths below `seq_len`.

    Returns:
        A `tf.data.Dataset` of `(inputs, targets)` int32 tensors of shape
        `[batch, length]`.

    Example:

    >>> ds = lm_dataset(texts, tokenizer, seq_len=64, batch_size=32)
    >>> inputs, targets = next(iter(ds))
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    dataset = _as_dataset(texts, "texts")
    dataset = _maybe_shuffle(dataset, shuffle, seed)

    def to_example(ids):
        ids = tf.concat([[START_ID], ids[:seq_len - 1], [END_ID]], axis=0)
        return ids[:-1], ids[1:]

    dataset = _tokenized(dataset, tokenizer).map(
        to_example, num_parallel_calls=tf.data.AUTOTUNE
    )
    return _batched(
        dataset,
        length=lambda inputs, targets: tf.shape(inputs)[0],
        padded_shapes=([seq_len], [seq_len]),
        max_len=seq_len,
        batch_size=batch_size,
        fixed_length=fixed_length,
        bucket_boundaries=bucket_boundaries,
    )


def translation_dataset(
    pairs,
    tokenizer,
    max_len,
    batch_size,
    shuffle=True,
    seed=None,
    fixed_length=False,
    bucket_boundaries=None,
):
    """Builds a sequence-to-sequence dataset for teacher-forced training.

    The source becomes `[START] tokens [END]` and the target sequence
    `[START] tokens [END]`, each truncated (tokens dropped, `[END]` kept) to at
    most `max_len` ids for the source and `max_len + 1` for the target, whose
    first `max_len` ids are the decoder inputs and last `max_len` the
    targets. Everything is padded with 0; a target of 0 is padding.

    Args:
        pairs: list of `(source, target)` strings, or a `tf.data.Dataset`
            of `(source, target)` scalar strings.
        tokenizer: a `WordpieceTokenizer`, usually with a vocabulary shared
            by both languages (`WordpieceTokenizer.from_translation_pairs`).
        max_len: maximum length of the source and of the decoder inputs.
        batch_size: number of pairs per batch.
        shuffle: whether to shuffle the pairs (again at every epoch).
        seed: shuffling seed, for a reproducible order.
        fixed_length: `True` pads every batch to `max_len` and drops the last
            incomplete batch (static shapes); `False` uses length bucketing
            on the longer of source and target.
        bucket_boundaries: increasing lengths separating the buckets; by
            default a fixed set of lengths below `max_len`.

    Returns:
        A `tf.data.Dataset` of `((source_ids, decoder_input_ids), target_ids)`
        int32 tensors of shape `[batch, length]`.

    Example:

    >>> ds = translation_dataset(pairs, tokenizer, max_len=64, batch_size=32)
    >>> (source, decoder_inputs), targets = next(iter(ds))
    """
    _check_positive(max_len=max_len, batch_size=batch_size)
    if max_len < 2:
        raise ValueError(f"`max_len` must be at least 2 ([START] and [END]), got {max_len}.")
    if isinstance(pairs, tf.data.Dataset):
        dataset = pairs
    else:
        pairs = list(pairs)
        if not pairs:
            raise ValueError("`pairs` is empty.")
        dataset = tf.data.Dataset.from_tensor_slices(
            ([s for s, _ in pairs], [t for _, t in pairs])
        )
    dataset = _maybe_shuffle(dataset, shuffle, seed)

    def tokenize(sources, targets):
        return tokenizer.tokenize(sources), tokenizer.tokenize(targets)

    def to_example(source, target):
        source = tf.concat([[START_ID], source[:max_len - 2], [END_ID]], axis=0)
        target = tf.concat([[START_ID], target[:max_len - 1], [END_ID]], axis=0)
        return (source, target[:-1]), target[1:]

    dataset = (
        dataset.batch(_TOKENIZE_BATCH)
        .map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
        .unbatch()
        .map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
    )
    return _batched(
        dataset,
        length=lambda inputs, targets: tf.maximum(
            tf.shape(inputs[0])[0], tf.shape(targets)[0]
        ),
        padded_shapes=(([max_len], [max_len]), [max_len]),
        max_len=max_len,
        batch_size=batch_size,
        fixed_length=fixed_length,
        bucket_boundaries=bucket_boundaries,
    )


def lm_stream_dataset(ids, batch_size, seq_len):
    """Consecutive segments of one token stream, for truncated backpropagation.

    The standard word-level protocol (as TensorFlow's PTB tutorial): the
    stream is cut into `batch_size` equal rows, and batch `j` holds columns
    `[j * seq_len, (j + 1) * seq_len)` of every row, so row `b` of each batch
    continues row `b` of the batch before. A model with stateful recurrent
    layers (`lstm_lm(..., stateful=True)`) then carries its state across
    batches and sees the whole stream. The tail that does not fill a batch
    is dropped; targets are the inputs shifted by one token.

    Args:
        ids: 1-D int sequence, e.g. `WordVocabulary.encode(texts)`.
        batch_size: number of parallel rows.
        seq_len: time steps per batch.

    Returns:
        A `tf.data.Dataset` of `(inputs, targets)` int32 `[batch_size,
        seq_len]`, in stream order (never shuffle it).

    Example:

    >>> ds = lm_stream_dataset(np.arange(1, 22), batch_size=2, seq_len=3)
    >>> [x.numpy().tolist() for x, _ in ds][0]
    [[1, 2, 3], [11, 12, 13]]
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    ids = tf.convert_to_tensor(ids, tf.int32)
    if ids.shape.rank != 1:
        raise ValueError(f"`ids` must be a 1-D stream of token ids, got shape {ids.shape}.")
    steps = (int(ids.shape[0]) - 1) // (batch_size * seq_len)
    if steps < 1:
        raise ValueError(
            f"`ids` holds {ids.shape[0]} tokens, too few for one batch of "
            f"batch_size * seq_len + 1 = {batch_size * seq_len + 1}."
        )
    length = steps * seq_len
    rows = (int(ids.shape[0]) - 1) // batch_size
    inputs = tf.reshape(ids[: batch_size * rows], [batch_size, rows])[:, :length]
    targets = tf.reshape(ids[1 : batch_size * rows + 1], [batch_size, rows])[:, :length]

    def segments(x):
        return tf.transpose(tf.reshape(x, [batch_size, steps, seq_len]), [1, 0, 2])

    return tf.data.Dataset.from_tensor_slices((segments(inputs), segments(targets)))


def _check_positive(**values):
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _as_dataset(texts, name):
    if isinstance(texts, tf.data.Dataset):
        return texts
    texts = list(texts)
    if not texts:
        raise ValueError(f"`{name}` is empty.")
    return tf.data.Dataset.from_tensor_slices(texts)


def _maybe_shuffle(dataset, shuffle, seed):
    if not shuffle:
        return dataset
    # Shuffling the raw strings is cheap; a buffer of 100k covers the whole of
    # the default corpora.
    return dataset.shuffle(100_000, seed=seed, reshuffle_each_iteration=True)


def _tokenized(dataset, tokenizer):
    return (
        dataset.batch(_TOKENIZE_BATCH)
        .map(tokenizer.tokenize, num_parallel_calls=tf.data.AUTOTUNE)
        .unbatch()
    )


def _batched(
    dataset, length, padded_shapes, max_len, batch_size, fixed_length, bucket_boundaries
):
    if fixed_length:
        dataset = dataset.padded_batch(
            batch_size,
            padded_shapes=padded_shapes,
            padding_values=PAD_ID,
            drop_remainder=True,
        )
    else:
        if bucket_boundaries is None:
            bucket_boundaries = [b for b in _DEFAULT_BOUNDARIES if b < max_len]
        bucket_boundaries = list(bucket_boundaries)
        if bucket_boundaries != sorted(set(bucket_boundaries)) or any(
            b <= 0 for b in bucket_boundaries
        ):
            raise ValueError(
                "`bucket_boundaries` must be strictly increasing positive "
                f"lengths, got {bucket_boundaries}."
            )
        dataset = dataset.bucket_by_sequence_length(
            element_length_func=length,
            bucket_boundaries=bucket_boundaries,
            bucket_batch_sizes=[batch_size] * (len(bucket_boundaries) + 1),
            padding_values=PAD_ID,
        )
    return dataset.prefetch(tf.data.AUTOTUNE)
