"""A Keras model whose training step reports task loss, MoE loss and perplexity."""

import keras
import tensorflow as tf

from tf_moe import _internals

_unpack = keras.utils.unpack_x_y_sample_weight


def scale_loss_for_distribution(loss):
    """Divides a per-replica loss by the number of replicas in sync.

    Gradients are summed over replicas, so this makes the update that of the
    mean loss (what Keras does to compiled and `add_loss` losses).
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss if replicas == 1 else loss / float(replicas)


def masked_token_cross_entropy(targets, logits, pad_id=0, sample_weight=None):
    """Mean next-token cross-entropy over the non-padding targets.

    Args:
        targets: [...] int token ids; positions equal to `pad_id` are ignored.
        logits: [..., vocab] unnormalised scores.
        pad_id: id of the padding token.
        sample_weight: optional weights broadcastable to `targets`.

    Returns:
        `(mean_loss, weight)`: the weighted mean negative log-likelihood in
        nats (float32) and the total weight of the counted targets (the
        number of real tokens without `sample_weight`).
    """
    targets = tf.cast(targets, tf.int32)
    logits = tf.cast(logits, tf.float32)
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
    weight = tf.cast(tf.not_equal(targets, pad_id), tf.float32)
    if sample_weight is not None:
        weight = weight * tf.cast(sample_weight, tf.float32)
    total = tf.reduce_sum(weight)
    return tf.math.divide_no_nan(tf.reduce_sum(nll * weight), total), total


@keras.saving.register_keras_serializable(package="tf_moe")
class Perplexity(keras.metrics.Mean):
    """`exp` of the running token-weighted mean cross-entropy (in nats).

    Example:

    >>> m = Perplexity()
    >>> m.update_state(2.0, sample_weight=10.0)
    >>> float(m.result())  # doctest: +ELLIPSIS
    7.389...
    """

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)

    def result(self):
        return tf.exp(super().result())


@keras.saving.register_keras_serializable(package="tf_moe")
class MoEModel(keras.Model):
    """A `keras.Model` for token prediction with MoE layers.

    The model maps its inputs to logits `[..., vocab]`; the targets `y` are
    token ids with `pad_id` at padding positions. `train_step` minimises the
    masked token cross-entropy plus the sum of the model's `add_loss` losses
    (the MoE balancing losses and any regularisers), and the logs show them
    apart: `loss` (the total), `task_loss`, `aux_loss`, `perplexity`
    (`exp` of the task loss; all three losses are means over the epoch's
    tokens) and, automatically, every MoE
    layer's load-balance metrics. Use it like `keras.Model`, functional
    (`MoEModel(inputs, outputs)`) or subclassed; compile it without a loss.

    Under a `tf.distribute` strategy each replica minimises its own mean
    loss scaled by `1 / num_replicas` (the Keras convention: gradients are
    summed over replicas), and the metrics aggregate over all replicas.

    Args:
        pad_id: int, target id excluded from the loss and perplexity.
        *args, **kwargs: `keras.Model` arguments (`inputs`, `outputs`,
            `name`, ...).

    Example:

    >>> inputs = keras.Input((None,), dtype="int32")
    >>> x = keras.layers.Embedding(100, 16, mask_zero=True)(inputs)
    >>> model = MoEModel(inputs, keras.layers.Dense(100)(x))
    >>> model.compile(optimizer="adam")
    """

    def __init__(self, *args, pad_id=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad_id = int(pad_id)
        self.task_loss_tracker = keras.metrics.Mean(name="task_loss")
        self.aux_loss_tracker = keras.metrics.Mean(name="aux_loss")
        self.perplexity_tracker = Perplexity(name="perplexity")

    def _task_and_aux_losses(self, x, y, sample_weight, training):
        if y is None:
            raise ValueError("MoEModel needs targets `y`: the token ids to predict.")
        if getattr(self, "loss", None) is not None:
            raise ValueError(
                "MoEModel computes its own masked token cross-entropy; compile it without `loss`."
            )
        logits = self(x, training=training)
        task_loss, tokens = masked_token_cross_entropy(y, logits, self.pad_id, sample_weight)
        aux_losses = [tf.cast(tf.reduce_sum(loss), tf.float32) for loss in self.losses]
        aux_loss = tf.add_n(aux_losses) if aux_losses else tf.zeros(())
        return task_loss, aux_loss, tokens

    def _update_trackers(self, task_loss, aux_loss, tokens):
        _internals.loss_tracker(self).update_state(task_loss + aux_loss, sample_weight=tokens)
        self.task_loss_tracker.update_state(task_loss, sample_weight=tokens)
        self.perplexity_tracker.update_state(task_loss, sample_weight=tokens)
        self.aux_loss_tracker.update_state(aux_loss)
        return self.get_metrics_result()

    def make_train_function(self, force=False):
        # Without a strategy Keras builds the optimizer inside the first trace
        # of the train step; its new variables make TensorFlow trace the step
        # a second time. Built here (as Keras does under a strategy), the
        # first `fit` traces it once: about a third less start-up time.
        if self.built and self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        return super().make_train_function(force)

    def train_step(self, data):
        x, y, sample_weight = _unpack(data)
        with tf.GradientTape() as tape:
            task_loss, aux_loss, tokens = self._task_and_aux_losses(x, y, sample_weight, training=True)
            loss = scale_loss_for_distribution(task_loss + aux_loss)
            scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return self._update_trackers(task_loss, aux_loss, tokens)

    def test_step(self, data):
        x, y, sample_weight = _unpack(data)
        # Layers add their losses only while training; at evaluation the
        # balancing losses are still reported by each MoE layer's metrics.
        task_loss, aux_loss, tokens = self._task_and_aux_losses(x, y, sample_weight, training=False)
        return self._update_trackers(task_loss, aux_loss, tokens)

    def get_config(self):
        config = super().get_config()
        config["pad_id"] = self.pad_id
        return config
