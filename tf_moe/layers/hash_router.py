"""Hash routing: the expert is a fixed function of the token id (Roller et al. 2021)."""

import keras
import tensorflow as tf

from tf_moe.layers.router import Router, Routing, check_per_token
from tf_moe.layers.router_registry import K_ONE, register_router
from tf_moe.ops import gating

_MASK32 = 0xFFFFFFFF
# Multiplier of the 32-bit integer mixing function below (below 2**27, so
# that a 32-bit value times it stays far inside int64).
_MIX = 0x45D9F3B


def seed_offset(seed):
    """The 32-bit value that `seed` XORs into every token id before mixing."""
    return (int(seed) * 0x9E3779B1 + 0x7F4A7C15) & _MASK32


def hash_experts(token_ids, num_experts, seed=0):
    """A fixed pseudo-random map from token ids to experts.

    `h = (id mod 2**32) XOR seed_offset(seed)`, then twice
    `h = ((h >> 16) XOR h) * 0x45D9F3B mod 2**32` and once more
    `h = (h >> 16) XOR h`, a bijective 32-bit integer mixing function, and
    the expert is `h mod num_experts`. Written out in integer operations,
    so the same ids go to the same experts in every version of TensorFlow
    and numpy: a saved model keeps its routing. Over a vocabulary of
    consecutive ids, every expert gets about the same number of ids.

    Args:
        token_ids: integer tensor of any shape.
        num_experts: int.
        seed: int, picks one of the maps.

    Returns:
        int32 tensor of the shape of `token_ids`, values in [0, num_experts).
    """
    h = tf.math.floormod(tf.cast(token_ids, tf.int64), _MASK32 + 1)
    h = tf.bitwise.bitwise_xor(h, tf.constant(seed_offset(seed), tf.int64))
    for _ in range(2):
        h = tf.bitwise.bitwise_xor(tf.bitwise.right_shift(h, 16), h)
        h = tf.bitwise.bitwise_and(h * _MIX, _MASK32)
    h = tf.bitwise.bitwise_xor(tf.bitwise.right_shift(h, 16), h)
    return tf.cast(tf.math.floormod(h, num_experts), tf.int32)


@register_router("hash", k=K_ONE)
@keras.saving.register_keras_serializable(package="tf_moe")
class HashRouter(Router):
    """Hash routing: token id -> one expert by a fixed random map (Roller et al. 2021).

    "Hash Layers For Large Sparse Models" (NeurIPS 2021): each
    token goes to the one expert that a fixed hash of its vocabulary id
    picks (`hash_experts`: a pseudo-random map chosen by `seed`, about
    equally many vocabulary ids per expert), with gate value 1. Nothing is
    learned and nothing balanced: the router has no weights, no logits (so
    no z-loss) and no loss (`uses_balancing_loss` is False); importance and
    load (tokens per expert) are reported for the metrics. The load follows
    the unigram frequencies of the ids, which is the baseline Roller et al.
    compare learned routing against at fixed compute. The router costs no
    multiply-adds.

    It routes by the token ids, which `MoELayer` takes as a per-token call
    argument beside the hidden states: `moe(x, token_ids=ids)` with `ids`
    of shape `x.shape[:-1]` (in a functional model, the `keras.Input` of
    the ids). `required_inputs` names it, and `tf_moe.models.lstm_lm`
    passes its input ids.

    Args:
        num_experts: int, number of experts E.
        seed: int, which fixed map (default 0).
        **kwargs: base layer arguments (`name`, ...). `dtype` defaults to
            float32.

    Call arguments:
        inputs: [tokens, d] float tensor (only its number of rows is used).
        training: unused.
        mask: optional [tokens] bool; masked tokens are not routed.
        token_ids: [tokens] integer ids (required): one per token.

    Returns:
        A `Routing` of one assignment per token.

    Example:

    >>> ids = keras.Input((None,), dtype="int32")
    >>> x = keras.layers.Embedding(1000, 32)(ids)
    >>> y = MoELayer(hidden_units=64, router=HashRouter(8))(x, token_ids=ids)
    """

    loss_names = ()
    uses_balancing_loss = False
    has_logits = False
    required_inputs = ("token_ids",)

    def __init__(self, num_experts, seed=0, **kwargs):
        super().__init__(num_experts, 1, **kwargs)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        self.seed = seed

    def build(self, input_shape):
        self.check_input_shape(input_shape)

    def call(self, inputs, training=None, mask=None, token_ids=None):
        if token_ids is None:
            raise ValueError(
                "HashRouter routes by token id: pass `token_ids` (e.g. `moe(x, token_ids=ids)` "
                "with ids of shape `x.shape[:-1]`)."
            )
        token_ids = check_per_token("token_ids", token_ids, inputs, own_axes=False)
        if not token_ids.dtype.is_integer:
            raise TypeError(f"`token_ids` must be integers, got {token_ids.dtype.name}.")
        valid = None if mask is None else tf.reshape(tf.cast(mask, tf.bool), [-1])
        expert_index = hash_experts(tf.reshape(token_ids, [-1]), self.num_experts, self.seed)
        weight = tf.ones_like(expert_index, tf.float32)
        if valid is not None:
            expert_index = tf.where(valid, expert_index, self.num_experts)
            weight = tf.where(valid, weight, 0.0)
        load = gating.hard_load(expert_index, self.num_experts)
        return Routing(
            token_id=tf.range(tf.shape(expert_index)[0]),
            expert_id=expert_index,
            weight=weight,
            importance=load,
            load=load,
            dropped=tf.zeros(()),
            losses={},
            metrics={},
        )

    def ops_per_token(self, input_units):
        return 0

    def get_config(self):
        config = super().get_config()
        config["seed"] = self.seed
        return config
