"""The GNMT-style translation model of appendix E, at small scale, and its decoders."""

import functools
from typing import NamedTuple

import keras
import tensorflow as tf

from tf_moe.layers.legacy import v01_seq2seq_part_names
from tf_moe.layers.moe_layer import MoELayer
from tf_moe.models.lstm_lm import moe_layer, residual
from tf_moe.training.model import MoEModel

_NEG_INF = -1e9


class Seq2SeqParts(NamedTuple):
    """The parts of a `seq2seq` model that step-by-step decoding runs, by role.

    Fields:
        encoder: `keras.Model` from the source ids to the encoder output
            [batch, src_len, units].
        embedding: the shared embedding layer.
        decoder_lstm_1: the bottom decoder LSTM (its cell runs one step).
        attention: the encoder-decoder `MultiHeadAttention`.
        decoder_middle: tuple of the layers between the decoder LSTMs, in
            order (the MoE layer, or the dense stand-ins).
        decoder_lstm_2: the top decoder LSTM.
        logits: the softmax projection.
    """

    encoder: keras.Model
    embedding: keras.layers.Layer
    decoder_lstm_1: keras.layers.Layer
    attention: keras.layers.Layer
    decoder_middle: tuple
    decoder_lstm_2: keras.layers.Layer
    logits: keras.layers.Layer

    @classmethod
    def of(cls, model):
        """The parts of `model`, a `Seq2SeqModel` (or a tf_moe 0.1 seq2seq `MoEModel`)."""
        names = getattr(model, "part_names", None) or v01_seq2seq_part_names(model)
        layer = model.get_layer
        return cls(
            encoder=keras.Model(model.inputs[0], layer(names["encoder_output"]).output),
            embedding=layer(names["embedding"]),
            decoder_lstm_1=layer(names["decoder_lstm_1"]),
            attention=layer(names["attention"]),
            decoder_middle=tuple(layer(name) for name in names["decoder_middle"]),
            decoder_lstm_2=layer(names["decoder_lstm_2"]),
            logits=layer(names["logits"]),
        )


@keras.saving.register_keras_serializable(package="tf_moe")
class Seq2SeqModel(MoEModel):
    """The `MoEModel` that `seq2seq` builds, with the roles of its layers recorded.

    `part_names` (saved in the config) maps each role of `Seq2SeqParts` to
    the layer that plays it, so decoders find the parts from the model
    itself; `parts` gives them as a `Seq2SeqParts`.

    Args:
        part_names: dict role -> layer name (`decoder_middle`: a list).
        *args, **kwargs: `MoEModel` arguments.
    """

    def __init__(self, *args, part_names=None, **kwargs):
        super().__init__(*args, **kwargs)
        roles = (set(Seq2SeqParts._fields) - {"encoder"}) | {"encoder_output"}
        if part_names is None or set(part_names) != roles:
            raise ValueError(
                "`part_names` must map each role of Seq2SeqParts (with `encoder_output` for "
                f"the encoder) to a layer name, got {part_names!r}."
            )
        self.part_names = dict(part_names)

    @property
    def parts(self):
        return Seq2SeqParts.of(self)

    def get_config(self):
        config = super().get_config()
        config["part_names"] = self.part_names
        return config


def seq2seq(
    vocab_size,
    units=512,
    num_experts=32,
    k=4,
    expert_hidden_units=1024,
    num_groups=None,
    attention_heads=4,
    dropout=0.1,
    importance_weight=None,
    load_weight=None,
    capacity_factor=None,
    use_moe=True,
    seed=None,
    gate_learning_rate_multiplier=1.0,
    name=None,
):
    """Encoder-decoder LSTMs with attention and two MoE layers (appendix E).

    GNMT cut to three encoder and two decoder LSTM layers, as in the paper:

    * encoder: embedding -> bidirectional LSTM -> LSTM -> MoE -> LSTM;
    * decoder: embedding -> LSTM -> MoE -> LSTM -> softmax, with the
      bottom decoder layer's output attending over the encoder output and
      the attention context fed to the top decoder LSTM.

    Source and target share one wordpiece vocabulary and one embedding;
    token id 0 is padding and is masked throughout. Every layer but the
    softmax has dropout on its output and a residual connection. With
    `use_moe=False` both MoE layers are replaced by dense feed-forward
    layers of the same ops per token (`k * expert_hidden_units` wide), the
    computationally matched baseline.

    Args:
        vocab_size: int, size of the shared vocabulary (0 is padding).
        units: int, width of the embedding, LSTMs and MoE outputs (even).
        num_experts, k, expert_hidden_units, num_groups: the MoE layers, as in
            `lstm_lm`.
        attention_heads: int, heads of the encoder-decoder attention.
        dropout: float, dropout rate.
        importance_weight, load_weight: the paper's balancing loss weights
            (`MoELayer`'s; None: 0.1 with the routers that use them).
        capacity_factor: None (dropless) or the MoEs' static capacity factor.
        use_moe: bool, False for the dense baseline.
        seed: optional seed of the gating noise.
        gate_learning_rate_multiplier: float > 0, as in `lstm_lm`.
        name: model name.

    Returns:
        A `Seq2SeqModel` (an `MoEModel`) with inputs `(source [batch, src_len],
        decoder_input [batch, tgt_len])` (int token ids; the decoder input is
        the target shifted right behind a start token) and float32 logits
        `[batch, tgt_len, vocab_size]`, whose `parts` are the layers that
        decoding reuses. Decode it with `Seq2SeqDecoder`.

    Example:

    >>> model = seq2seq(vocab_size=500, units=32, num_experts=4, k=2,
    ...                 expert_hidden_units=64)
    >>> model((np.ones((2, 9), "int32"), np.ones((2, 7), "int32"))).shape
    TensorShape([2, 7, 500])
    """
    _check_arguments(units, attention_heads)
    moe_kwargs = None
    if use_moe:
        moe_kwargs = dict(
            num_groups=num_groups, importance_weight=importance_weight, load_weight=load_weight,
            capacity_factor=capacity_factor, seed=seed,
            gate_learning_rate_multiplier=gate_learning_rate_multiplier,
        )
    middle = functools.partial(
        _middle_layers, units=units, num_experts=num_experts, k=k, expert_hidden_units=expert_hidden_units,
        moe_kwargs=moe_kwargs,
    )
    source = keras.Input((None,), dtype="int32", name="source")
    decoder_input = keras.Input((None,), dtype="int32", name="decoder_input")
    embedding = keras.layers.Embedding(vocab_size, units, mask_zero=True, name="embedding")
    encoded, encoder_output = _encoder(source, embedding, units, dropout, middle)
    logits, parts = _decoder(decoder_input, encoded, embedding, units, attention_heads, dropout, middle, vocab_size)
    part_names = {role: [layer.name for layer in part] if isinstance(part, list) else part.name
                  for role, part in dict(encoder_output=encoder_output, **parts).items()}
    return Seq2SeqModel(
        (source, decoder_input),
        logits,
        part_names=part_names,
        name=name or ("seq2seq_moe" if use_moe else "seq2seq_dense"),
    )


def _check_arguments(units, attention_heads):
    if not isinstance(units, int) or units < 2 or units % 2:
        raise ValueError(f"`units` must be an even int >= 2, got {units!r}.")
    if units % attention_heads:
        raise ValueError(
            f"`units` ({units}) must be a multiple of `attention_heads` ({attention_heads})."
        )


def _middle_layers(prefix, units, num_experts, k, expert_hidden_units, moe_kwargs):
    """The MoE layer between two LSTMs or, with `moe_kwargs` None, its dense stand-in of the same ops."""
    if moe_kwargs is not None:
        return [moe_layer(num_experts, k, expert_hidden_units, name=f"{prefix}_moe", **moe_kwargs)]
    return [
        keras.layers.Dense(k * expert_hidden_units, activation="relu", name=f"{prefix}_wide_hidden"),
        keras.layers.Dense(units, name=f"{prefix}_wide_output"),
    ]


def _apply_middle(x, layers, dropout, prefix):
    """`layers` on `x`, in order, with the dropout and residual connection."""
    y = x
    for layer in layers:
        y = layer(y)
    return residual(x, y, dropout, f"{prefix}_moe")


def _encoder(source, embedding, units, dropout, middle):
    """embedding -> bidirectional LSTM -> LSTM -> MoE -> LSTM; returns the output and its `Add` layer."""
    x = keras.layers.Dropout(dropout, name="encoder_embedding_dropout")(embedding(source))
    bidirectional = keras.layers.Bidirectional(
        keras.layers.LSTM(units // 2, return_sequences=True), name="encoder_lstm_1"
    )
    x = residual(x, bidirectional(x), dropout, "encoder_lstm_1")
    x = residual(x, keras.layers.LSTM(units, return_sequences=True, name="encoder_lstm_2")(x), dropout, "encoder_lstm_2")
    x = _apply_middle(x, middle("encoder"), dropout, "encoder")
    encoder_output = keras.layers.Add(name="encoder_lstm_3_residual")
    encoded = residual(
        x, keras.layers.LSTM(units, return_sequences=True, name="encoder_lstm_3")(x), dropout, "encoder_lstm_3",
        add=encoder_output,
    )
    return encoded, encoder_output


def _decoder(decoder_input, encoded, embedding, units, attention_heads, dropout, middle, vocab_size):
    """embedding -> LSTM (attending over `encoded`) -> MoE -> LSTM -> softmax.

    Returns the logits and the decoder's parts: a dict of the roles of
    `Seq2SeqParts` but the encoder to their layers (`decoder_middle` a list).
    """
    y = keras.layers.Dropout(dropout, name="decoder_embedding_dropout")(embedding(decoder_input))
    bottom = keras.layers.LSTM(units, return_sequences=True, name="decoder_lstm_1")
    y = residual(y, bottom(y), dropout, "decoder_lstm_1")
    attention = keras.layers.MultiHeadAttention(
        attention_heads, units // attention_heads, name="attention"
    )
    context = attention(y, encoded)
    decoder_middle = middle("decoder")
    y = _apply_middle(y, decoder_middle, dropout, "decoder")
    top = keras.layers.LSTM(units, return_sequences=True, name="decoder_lstm_2")
    y = residual(y, top(keras.layers.Concatenate(name="decoder_lstm_2_input")([y, context])), dropout, "decoder_lstm_2")
    logits = keras.layers.Dense(vocab_size, dtype="float32", name="logits")
    parts = dict(
        embedding=embedding, decoder_lstm_1=bottom, attention=attention, decoder_middle=decoder_middle,
        decoder_lstm_2=top, logits=logits,
    )
    return logits(y), parts


class Seq2SeqDecoder(tf.Module):
    """Greedy and beam-search decoding of a `seq2seq` model, in TF ops.

    Runs the encoder once, then the decoder one token at a time from the
    same layers (LSTM cells with explicit states), inside `tf.function`s
    with `tf.while_loop`s, so both decoders can be exported in a
    SavedModel. Both return `[batch, max_length]` int32 ids without the
    start token; everything after a sequence's end token is padding (0).

    Args:
        model: a model built by `seq2seq` (its `Seq2SeqParts` are the
            layers the decoder runs). A decoder MoE whose router is not
            causal (expert choice) is refused with a ValueError.
        start_id: int, id of the start token the decoder input begins with.
        end_id: int, id of the end token.
        max_length: int, most target tokens to generate.

    Example:

    >>> decoder = Seq2SeqDecoder(model, start_id=2, end_id=3, max_length=20)
    >>> ids = decoder.greedy(source_ids)          # doctest: +SKIP
    >>> ids = decoder.beam_search(source_ids, 4)  # doctest: +SKIP
    """

    def __init__(self, model, start_id, end_id, max_length=64):
        super().__init__(name="seq2seq_decoder")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"`max_length` must be a positive int, got {max_length!r}.")
        self.model = model
        self.start_id = int(start_id)
        self.end_id = int(end_id)
        self.max_length = max_length
        parts = Seq2SeqParts.of(model)
        self._encoder = parts.encoder
        self._embedding = parts.embedding
        self._lstm_1 = parts.decoder_lstm_1.cell
        self._lstm_2 = parts.decoder_lstm_2.cell
        self._attention = parts.attention
        self._middle = list(parts.decoder_middle)
        for layer in self._middle:
            if isinstance(layer, MoELayer) and not layer.router.causal:
                raise ValueError(
                    f"The decoder's {layer.name} uses {type(layer.router).__name__}, which is not "
                    "causal: step-by-step decoding would route each step's batch of one token per "
                    "sequence unlike the training batch."
                )
        self._logits = parts.logits
        self.units = self._lstm_1.units

    def _encode(self, source):
        source = tf.cast(source, tf.int32)
        return self._encoder(source, training=False), tf.not_equal(source, 0)

    def _initial_states(self, batch):
        zeros = tf.zeros([batch, self.units], self.model.compute_dtype)
        return (zeros, zeros, zeros, zeros)

    def _step(self, tokens, states, encoded, source_mask):
        """One decoder step: [batch] tokens -> [batch, vocab] log-probs.

        Padding (id 0) is never predicted.
        """
        x = tf.cast(tf.gather(self._embedding.embeddings, tokens), self.model.compute_dtype)
        h, (h1, c1) = self._lstm_1(x, list(states[:2]), training=False)
        x = x + h
        context = self._attention(x[:, None], encoded, attention_mask=source_mask[:, None, :])[:, 0]
        y = x
        for layer in self._middle:
            y = layer(y, training=False)
        x = x + y
        h, (h2, c2) = self._lstm_2(tf.concat([x, context], -1), list(states[2:]), training=False)
        logits = tf.cast(self._logits(x + h), tf.float32)
        not_pad = tf.range(tf.shape(logits)[-1]) > 0
        logits = tf.where(not_pad, logits, _NEG_INF)
        return tf.nn.log_softmax(logits), (h1, c1, h2, c2)

    @tf.function
    def greedy(self, source):
        """Most likely next token at every step. `source`: [batch, src_len] ids."""
        encoded, source_mask = self._encode(source)
        batch = tf.shape(source)[0]
        states = self._initial_states(batch)
        tokens = tf.fill([batch], self.start_id)
        finished = tf.zeros([batch], tf.bool)
        sequences = tf.zeros([batch, self.max_length], tf.int32)
        positions = tf.range(self.max_length)
        for t in tf.range(self.max_length):
            log_probs, states = self._step(tokens, states, encoded, source_mask)
            tokens = tf.where(finished, 0, tf.argmax(log_probs, -1, output_type=tf.int32))
            sequences = tf.where(positions == t, tokens[:, None], sequences)
            finished = finished | tf.equal(tokens, self.end_id)
            if tf.reduce_all(finished):
                break
        return sequences

    @tf.function
    def beam_search(self, source, beam_size=4, length_penalty=0.0):
        """Beam search; the best hypothesis per sentence.

        Hypotheses are ranked by log-probability divided by GNMT's length
        penalty `((5 + length) / 6) ** length_penalty` (0: no penalty).
        `beam_size` is a Python int (one trace per value).
        """
        encoded, source_mask = self._encode(source)
        batch = tf.shape(source)[0]
        flat = batch * beam_size

        def tile(x):  # [batch, ...] -> [batch * beam, ...], beams adjacent.
            return tf.repeat(x, beam_size, axis=0)

        encoded, source_mask = tile(encoded), tile(source_mask)
        states = self._initial_states(flat)
        tokens = tf.fill([flat], self.start_id)
        # Only the first beam is alive at the start, so beams do not repeat.
        scores = tf.tile(tf.constant([[0.0] + [_NEG_INF] * (beam_size - 1)]), [batch, 1])
        finished = tf.zeros([batch, beam_size], tf.bool)
        lengths = tf.zeros([batch, beam_size], tf.int32)
        sequences = tf.zeros([batch, beam_size, self.max_length], tf.int32)
        positions = tf.range(self.max_length)
        for t in tf.range(self.max_length):
            tf.autograph.experimental.set_loop_options(
                shape_invariants=[
                    (scores, tf.TensorShape([None, beam_size])),
                    (finished, tf.TensorShape([None, beam_size])),
                    (lengths, tf.TensorShape([None, beam_size])),
                    (sequences, tf.TensorShape([None, beam_size, self.max_length])),
                    (tokens, tf.TensorShape([None])),
                    (states, (tf.TensorShape([None, self.units]),) * 4),
                ]
            )
            log_probs, states = self._step(tokens, states, encoded, source_mask)
            vocab = tf.shape(log_probs)[-1]
            log_probs = tf.reshape(log_probs, [batch, beam_size, vocab])
            # A finished hypothesis can only be extended by padding, for free.
            pad_only = tf.one_hot(0, vocab, on_value=0.0, off_value=_NEG_INF)
            log_probs = tf.where(finished[..., None], pad_only, log_probs)
            candidates = tf.reshape(scores[..., None] + log_probs, [batch, -1])
            scores, index = tf.math.top_k(candidates, beam_size)
            parent = index // vocab
            tokens = index % vocab
            finished = tf.gather(finished, parent, batch_dims=1)
            lengths = tf.gather(lengths, parent, batch_dims=1) + tf.cast(~finished, tf.int32)
            sequences = tf.gather(sequences, parent, batch_dims=1)
            sequences = tf.where(positions == t, tokens[..., None], sequences)
            finished = finished | tf.equal(tokens, self.end_id)
            flat_parent = tf.reshape(parent + beam_size * tf.range(batch)[:, None], [-1])
            states = tuple(tf.gather(s, flat_parent) for s in states)
            tokens = tf.reshape(tokens, [-1])
            if tf.reduce_all(finished):
                break
        penalty = ((5.0 + tf.cast(lengths, tf.float32)) / 6.0) ** length_penalty
        best = tf.argmax(scores / penalty, axis=-1, output_type=tf.int32)
        return tf.gather(sequences, best, batch_dims=1)
