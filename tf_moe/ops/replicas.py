"""Replica-aware helpers for layers used under a `tf.distribute` strategy."""

import tensorflow as tf


def cross_replica_sum(values):
    """Sums a list of tensors over the replicas of a tf.distribute strategy.

    The balancing losses (Shazeer et al. 2017, section 4) are functions of
    the whole batch X, so under data parallelism importance and load are
    summed over replicas before CV^2, and every replica sees the loss of the
    global batch. The forward pass is one all-reduce; the backward pass needs
    none: each replica sends the loss gradient into its own share, scaled by
    the number of replicas to undo Keras's 1/replicas loss scaling, so the
    summed gradients equal single-device training on the global batch.
    Outside a strategy (or with one replica) the values come back unchanged.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    replicas = float(context.num_replicas_in_sync)
    totals = context.all_reduce(tf.distribute.ReduceOp.SUM, [tf.stop_gradient(v) for v in values])
    return [
        total + replicas * (value - tf.stop_gradient(value))
        for total, value in zip(totals, values)
    ]


def _replica_seed(seed_generator):
    """The generator's next seed with the replica id folded in.

    Replicas share the mirrored generator state, so without the replica id in
    the seed every replica would draw the same noise.
    """
    seed = seed_generator.next()
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        seed = seed + tf.cast(tf.stack([context.replica_id_in_sync_group, 0]), seed.dtype)
    # int32 seeds, as keras.random does, so the draw compiles with XLA.
    return tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)


def replica_normal(seed_generator, shape):
    """Standard-normal draws; each data-parallel replica gets its own stream."""
    return tf.random.stateless_normal(shape, seed=_replica_seed(seed_generator))


def replica_uniform(seed_generator, shape, minval, maxval):
    """Uniform draws in [minval, maxval); each data-parallel replica gets its own stream."""
    return tf.random.stateless_uniform(shape, seed=_replica_seed(seed_generator), minval=minval, maxval=maxval)
