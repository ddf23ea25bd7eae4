"""Tests of the tf.data pipelines for language modelling and translation."""

import numpy as np
import pytest
import tensorflow as tf

from tests.test_data_tokenizer import learn_test_tokenizer
from tf_moe import data
from tf_moe.reproduction import corpora


@pytest.fixture(scope="session")
def texts():
    # The validation books: about 1.3k verses of varied lengths.
    return corpora.load_lm_corpus("web", "valid")


@pytest.fixture(scope="session")
def pairs():
    return corpora.load_translation_pairs("web-sparv", "valid")


@pytest.fixture(scope="session")
def tokenizer():
    return learn_test_tokenizer()


def _lengths(ids):
    return np.sum(ids != data.PAD_ID, axis=1)


def _decode(strings):
    return [s.decode("utf-8") for s in strings.numpy()]


def _check_padding_is_a_suffix(ids):
    for row, length in zip(ids, _lengths(ids)):
        assert np.all(row[:length] != data.PAD_ID) and np.all(row[length:] == data.PAD_ID)


def test_lm_batches_are_shifted_padded_int32(texts, tokenizer):
    dataset = data.lm_dataset(texts, tokenizer, seq_len=48, batch_size=16, shuffle=False)
    assert dataset.element_spec[0].dtype == tf.int32
    assert dataset.element_spec[0].shape.as_list() == [None, None]
    num_sequences = 0
    for inputs, targets in dataset:
        inputs, targets = inputs.numpy(), targets.numpy()
        assert inputs.shape == targets.shape and inputs.shape[0] <= 16
        assert inputs.shape[1] <= 48
        _check_padding_is_a_suffix(inputs)
        np.testing.assert_array_equal(_lengths(inputs), _lengths(targets))
        assert np.all(inputs[:, 0] == data.START_ID)
        for row_in, row_out, length in zip(inputs, targets, _lengths(inputs)):
            # Targets are the inputs shifted by one, ending with [END].
            np.testing.assert_array_equal(row_in[1:length], row_out[: length - 1])
            assert row_out[length - 1] == data.END_ID
        num_sequences += inputs.shape[0]
    assert num_sequences == len(texts)


def test_lm_sequences_match_the_tokenizer(texts, tokenizer):
    dataset = data.lm_dataset(texts[:5], tokenizer, seq_len=200, batch_size=5, shuffle=False)
    got = [
        row[1:length].tolist()
        for inputs, _ in dataset
        for row, length in zip(inputs.numpy(), _lengths(inputs.numpy()))
    ]
    assert sorted(got) == sorted(tokenizer.tokenize(texts[:5]).to_list())


def test_lm_fixed_length_has_static_shapes(texts, tokenizer):
    dataset = data.lm_dataset(
        texts, tokenizer, seq_len=32, batch_size=16, fixed_length=True, seed=0
    )
    assert dataset.element_spec[0].shape.as_list() == [16, 32]
    assert dataset.element_spec[1].shape.as_list() == [16, 32]
    batches = list(dataset)
    assert len(batches) == len(texts) // 16
    inputs = np.concatenate([b[0].numpy() for b in batches])
    # Long verses are truncated to exactly seq_len ids and still end in [END].
    full = inputs[_lengths(inputs) == 32]
    assert len(full) > 0
    targets = np.concatenate([b[1].numpy() for b in batches])
    assert np.all(targets[_lengths(inputs) == 32][:, -1] == data.END_ID)


def test_bucketing_groups_similar_lengths(texts, tokenizer):
    boundaries = [16, 32, 48]
    dataset = data.lm_dataset(
        texts, tokenizer, seq_len=64, batch_size=8, bucket_boundaries=boundaries, seed=1
    )
    widths = set()
    for inputs, _ in dataset:
        buckets = np.searchsorted(boundaries, _lengths(inputs.numpy()), side="right")
        assert len(set(buckets.tolist())) == 1
        widths.add(inputs.shape[1])
    assert len(widths) > 3


def test_shuffling_is_seeded(texts, tokenizer):
    def first_batch(seed):
        dataset = data.lm_dataset(texts, tokenizer, seq_len=32, batch_size=8, seed=seed)
        return next(iter(dataset))[0].numpy()

    np.testing.assert_array_equal(first_batch(3), first_batch(3))
    assert not np.array_equal(first_batch(3), first_batch(4))


def test_translation_batches(pairs, tokenizer):
    dataset = data.translation_dataset(pairs, tokenizer, max_len=40, batch_size=8, seed=0)
    (source_spec, decoder_spec), target_spec = dataset.element_spec
    assert source_spec.dtype == decoder_spec.dtype == target_spec.dtype == tf.int32
    num_pairs = 0
    for (source, decoder_inputs), targets in dataset:
        source, decoder_inputs, targets = source.numpy(), decoder_inputs.numpy(), targets.numpy()
        assert source.shape[1] <= 40 and decoder_inputs.shape[1] <= 40
        assert decoder_inputs.shape == targets.shape
        for ids in (source, decoder_inputs, targets):
            _check_padding_is_a_suffix(ids)
        assert np.all(source[:, 0] == data.START_ID)
        assert np.all(source[np.arange(len(source)), _lengths(source) - 1] == data.END_ID)
        assert np.all(decoder_inputs[:, 0] == data.START_ID)
        lengths = _lengths(targets)
        np.testing.assert_array_equal(lengths, _lengths(decoder_inputs))
        assert np.all(targets[np.arange(len(targets)), lengths - 1] == data.END_ID)
        for row_in, row_out, length in zip(decoder_inputs, targets, lengths):
            np.testing.assert_array_equal(row_in[1:length], row_out[: length - 1])
        num_pairs += len(source)
    assert num_pairs == len(pairs)


def test_translation_pairs_stay_together(pairs, tokenizer):
    dataset = data.translation_dataset(
        pairs[:4], tokenizer, max_len=100, batch_size=4, shuffle=False
    )
    decoded = [
        pair
        for (source, decoder_inputs), _ in dataset
        for pair in zip(
            _decode(tokenizer.detokenize(source)), _decode(tokenizer.detokenize(decoder_inputs))
        )
    ]
    expected = zip(
        _decode(tokenizer.normalize([s for s, _ in pairs[:4]])),
        _decode(tokenizer.normalize([t for _, t in pairs[:4]])),
    )
    assert sorted(decoded) == sorted(expected)


def test_translation_fixed_length(pairs, tokenizer):
    dataset = data.translation_dataset(
        pairs, tokenizer, max_len=24, batch_size=8, fixed_length=True, shuffle=False
    )
    (source_spec, decoder_spec), target_spec = dataset.element_spec
    for spec in (source_spec, decoder_spec, target_spec):
        assert spec.shape.as_list() == [8, 24]
    (source, _), targets = next(iter(dataset))
    assert source.shape == (8, 24) and targets.shape == (8, 24)


def test_bad_arguments_are_rejected(texts, pairs, tokenizer):
    with pytest.raises(ValueError, match="`seq_len`"):
        data.lm_dataset(texts, tokenizer, seq_len=0, batch_size=8)
    with pytest.raises(ValueError, match="`batch_size`"):
        data.translation_dataset(pairs, tokenizer, max_len=16, batch_size=-1)
    with pytest.raises(ValueError, match="`bucket_boundaries`"):
        data.lm_dataset(texts, tokenizer, seq_len=32, batch_size=8, bucket_boundaries=[16, 8])
    with pytest.raises(ValueError, match="`texts` is empty"):
        data.lm_dataset([], tokenizer, seq_len=32, batch_size=8)


def test_stream_rows_continue_across_batches():
    from tf_moe.data import lm_stream_dataset

    ids = np.arange(1, 104, dtype=np.int32)  # 103 tokens
    batches = list(lm_stream_dataset(ids, batch_size=4, seq_len=5))
    # (103 - 1) // 20 = 5 batches; each row is a contiguous slice of the stream.
    assert len(batches) == 5
    inputs = np.concatenate([x.numpy() for x, _ in batches], axis=1)
    targets = np.concatenate([y.numpy() for _, y in batches], axis=1)
    assert inputs.shape == (4, 25) and inputs.dtype == np.int32
    rows = (len(ids) - 1) // 4
    for b in range(4):
        np.testing.assert_array_equal(inputs[b], ids[b * rows : b * rows + 25])
        np.testing.assert_array_equal(targets[b], ids[b * rows + 1 : b * rows + 26])


def test_stream_rejects_bad_input():
    from tf_moe.data import lm_stream_dataset

    with pytest.raises(ValueError, match="too few"):
        lm_stream_dataset(np.arange(10), batch_size=4, seq_len=5)
    with pytest.raises(ValueError, match="1-D"):
        lm_stream_dataset(np.ones((3, 40), np.int32), batch_size=2, seq_len=5)
    with pytest.raises(ValueError, match="seq_len"):
        lm_stream_dataset(np.arange(100), batch_size=2, seq_len=0)
