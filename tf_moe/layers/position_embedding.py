"""Learned absolute position embeddings, added to token embeddings."""

import keras
import tensorflow as tf

from tf_moe.layers.checks import check_positive_int


@keras.saving.register_keras_serializable(package="tf_moe")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position to a sequence of vectors.

    `y[b, t] = x[b, t] + P[t]` for `t < max_length`, as in the GPT-style
    decoders (Radford et al. 2018) that MoE Transformers start from. The
    input's mask passes through unchanged.

    Args:
        max_length: int, the longest sequence the layer accepts.
        initializer: initializer of the [max_length, d] table.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: [batch, time, d] with `time <= max_length`.

    Returns:
        [batch, time, d].

    Example:

    >>> layer = PositionEmbedding(max_length=16)
    >>> layer(keras.ops.zeros((2, 5, 8))).shape
    TensorShape([2, 5, 8])
    """

    def __init__(self, max_length, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        check_positive_int("max_length", max_length)
        self.max_length = max_length
        self.initializer = keras.initializers.get(initializer)
        self.supports_masking = True

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(f"`inputs` of PositionEmbedding must be [batch, time, d] with known d, got {input_shape}.")
        if input_shape[1] is not None and input_shape[1] > self.max_length:
            raise ValueError(f"`inputs` has {input_shape[1]} positions, more than `max_length` ({self.max_length}).")
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.max_length, input_shape[-1]), initializer=self.initializer
        )

    def call(self, inputs):
        length = tf.shape(inputs)[1]
        check = tf.debugging.assert_less_equal(
            length, self.max_length, message="PositionEmbedding: the sequence is longer than `max_length`"
        )
        with tf.control_dependencies([check]):
            table = tf.cast(self.embeddings[:length], inputs.dtype)
        return inputs + table[None]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"max_length": self.max_length, "initializer": keras.initializers.serialize(self.initializer)}
        )
        return config
