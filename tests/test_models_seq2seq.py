"""Tests of the GNMT-style seq2seq model and its greedy and beam-search decoders."""

import os
import sys

import keras
import numpy as np
import pytest

import tf_moe
from tf_moe.models import Seq2SeqDecoder, ops_per_timestep, seq2seq
from tf_moe.models.seq2seq import Seq2SeqModel, Seq2SeqParts
from tf_moe.training import MoEModel

VOCAB, START, END = 40, 2, 3
SMALL = dict(vocab_size=VOCAB, units=16, num_experts=4, k=2, expert_hidden_units=32, attention_heads=2, dropout=0.0, seed=0)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    source = rng.integers(4, VOCAB, (3, 7)).astype("int32")
    source[0, 5:] = 0
    decoder_input = rng.integers(4, VOCAB, (3, 6)).astype("int32")
    decoder_input[:, 0] = START
    decoder_input[2, 4:] = 0
    return source, decoder_input


@pytest.fixture(scope="module")
def model():
    # Seeded: the decoding tests compare argmaxes, which near-ties of other
    # weights could turn into a flaky failure.
    keras.utils.set_random_seed(0)
    return seq2seq(**SMALL)


def test_shapes_and_padding_does_not_change_real_logits(model):
    source, decoder_input = _batch()
    logits = np.asarray(model((source, decoder_input)))
    assert logits.shape == (3, 6, VOCAB)
    assert isinstance(model, MoEModel)
    for row, src_len, tgt_len in ((0, 5, 6), (2, 7, 4)):
        alone = np.asarray(model((source[row : row + 1, :src_len], decoder_input[row : row + 1, :tgt_len])))
        np.testing.assert_allclose(logits[row, :tgt_len], alone[0], rtol=1e-5, atol=1e-5)


def test_two_moe_layers_where_the_paper_puts_them(model):
    names = [layer.name for layer in model.layers]
    assert names.index("encoder_lstm_2") < names.index("encoder_moe") < names.index("encoder_lstm_3")
    assert names.index("decoder_lstm_1") < names.index("decoder_moe") < names.index("decoder_lstm_2")
    dense = seq2seq(**SMALL, use_moe=False)
    # Dense stand-ins cost what the MoE's k experts cost, without the gate.
    gates = 2 * SMALL["units"] * SMALL["num_experts"]
    assert ops_per_timestep(model) - ops_per_timestep(dense) == gates


def _teacher_forced_argmax(model, source, outputs):
    decoder_input = np.concatenate([np.full((len(source), 1), START), outputs[:, :-1]], 1)
    logits = np.array(model((source, decoder_input.astype("int32"))))
    logits[..., 0] = -np.inf  # the decoders never emit padding
    return logits.argmax(-1)


def test_greedy_follows_the_teacher_forced_model(model):
    source, _ = _batch(1)
    decoder = Seq2SeqDecoder(model, START, END, max_length=6)
    outputs = decoder.greedy(source).numpy()
    assert outputs.shape == (3, 6) and outputs.dtype == np.int32
    expected = _teacher_forced_argmax(model, source, outputs)
    for row in range(3):
        ends = np.flatnonzero(outputs[row] == END)
        stop = ends[0] + 1 if len(ends) else 6
        np.testing.assert_array_equal(outputs[row, :stop], expected[row, :stop])
        assert np.all(outputs[row, stop:] == 0)


def test_beam_one_equals_greedy_and_beams_end_in_padding(model):
    source, _ = _batch(2)
    decoder = Seq2SeqDecoder(model, START, END, max_length=8)
    greedy = decoder.greedy(source).numpy()
    np.testing.assert_array_equal(decoder.beam_search(source, beam_size=1).numpy(), greedy)
    beams = decoder.beam_search(source, beam_size=3, length_penalty=0.6).numpy()
    assert beams.shape == (3, 8)
    for row in beams:
        ends = np.flatnonzero(row == END)
        if len(ends):
            assert np.all(row[ends[0] + 1 :] == 0)


def _log_prob(model, source, outputs):
    decoder_input = np.concatenate([np.full((len(source), 1), START), outputs[:, :-1]], 1)
    logits = np.array(model((source, decoder_input.astype("int32"))), np.float64)
    logits[..., 0] = -np.inf
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(log_probs, outputs[..., None], -1)[..., 0]
    return np.where(outputs > 0, picked, 0.0).sum(-1)


def test_a_beam_as_wide_as_the_vocabulary_finds_the_most_likely_sequence():
    # With every first token kept (beam = vocabulary without padding), the
    # best of all two-token sequences survives the second step: the search
    # is exact, so at least as likely as greedy by construction, whatever
    # the weights.
    keras.utils.set_random_seed(3)
    model = seq2seq(**SMALL)
    # Sharper logits than at initialisation, so that greedy is often wrong.
    model.get_layer("logits").kernel.assign(model.get_layer("logits").kernel * 8.0)
    source, _ = _batch(3)
    decoder = Seq2SeqDecoder(model, START, END, max_length=2)
    beams = decoder.beam_search(source, beam_size=VOCAB - 1).numpy()
    # Every sequence the decoders may emit: two tokens, or [END] then padding.
    tokens = np.arange(1, VOCAB)
    candidates = np.array([[a, b] for a in tokens if a != END for b in tokens] + [[END, 0]], "int32")
    scores = _log_prob(model, np.repeat(source, len(candidates), 0), np.tile(candidates, (len(source), 1)))
    best = scores.reshape(len(source), len(candidates)).max(1)
    np.testing.assert_allclose(_log_prob(model, source, beams), best, rtol=1e-5, atol=1e-5)
    greedy = decoder.greedy(source).numpy()
    assert np.all(_log_prob(model, source, beams) >= _log_prob(model, source, greedy) - 1e-5)


@pytest.mark.parametrize("use_moe", (True, False))
def test_keras_round_trip_gives_identical_outputs(use_moe, tmp_path):
    model = seq2seq(**SMALL, use_moe=use_moe)
    source, decoder_input = _batch(5)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(np.asarray(loaded((source, decoder_input))), np.asarray(model((source, decoder_input))))
    loaded_decoder, decoder = Seq2SeqDecoder(loaded, START, END, 5), Seq2SeqDecoder(model, START, END, 5)
    np.testing.assert_array_equal(loaded_decoder.greedy(source).numpy(), decoder.greedy(source).numpy())


@pytest.mark.parametrize("use_moe", (True, False))
def test_parts_record_the_layers_decoding_reuses(use_moe):
    model = seq2seq(**SMALL, use_moe=use_moe)
    assert isinstance(model, Seq2SeqModel)
    parts = model.parts
    assert isinstance(parts, Seq2SeqParts)
    assert parts.embedding is model.get_layer("embedding") and parts.logits is model.get_layer("logits")
    middle = [type(layer).__name__ for layer in parts.decoder_middle]
    assert middle == (["MoELayer"] if use_moe else ["Dense", "Dense"])
    source, _ = _batch(6)
    encoded = np.asarray(parts.encoder(source))
    assert encoded.shape == (3, 7, SMALL["units"])


def test_a_seq2seq_model_saved_by_tf_moe_0_1_still_decodes(model):
    """0.1 saved a plain MoEModel with no recorded parts: its fixed layout is used."""
    legacy = MoEModel(model.inputs, model.outputs)
    assert not hasattr(legacy, "part_names")
    source, _ = _batch(7)
    legacy_decoder, decoder = Seq2SeqDecoder(legacy, START, END, 5), Seq2SeqDecoder(model, START, END, 5)
    np.testing.assert_array_equal(legacy_decoder.greedy(source).numpy(), decoder.greedy(source).numpy())


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="`units`"):
        seq2seq(**{**SMALL, "units": 15})
    with pytest.raises(ValueError, match="`max_length`"):
        Seq2SeqDecoder(model, START, END, max_length=0)
    with pytest.raises(ValueError, match="`part_names`"):
        Seq2SeqModel(model.inputs, model.outputs, part_names={"embedding": "embedding"})


def test_decoding_refuses_a_router_that_is_not_causal(monkeypatch):
    """Expert choice routes each decoding step's one-token-per-sequence batch
    unlike the training batch: the decoder says so instead of decoding."""
    module = sys.modules["tf_moe.models.seq2seq"]  # the package exports the function under this name

    def moe_layer(num_experts, k, hidden_units, name, **kwargs):
        return tf_moe.MoELayer(hidden_units=hidden_units, router=tf_moe.ExpertChoiceRouter(num_experts), name=name)

    monkeypatch.setattr(module, "moe_layer", moe_layer)
    model = seq2seq(**SMALL)
    with pytest.raises(ValueError, match="ExpertChoiceRouter"):
        Seq2SeqDecoder(model, START, END, 5)
