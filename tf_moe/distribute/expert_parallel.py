"""Expert parallelism: each expert lives on one replica (Shazeer et al. 2017, section 3.1)."""

import keras
import tensorflow as tf
from keras.src.backend.common.symbolic_scope import in_symbolic_scope

from tf_moe.layers.feed_forward_experts import FeedForwardExperts
from tf_moe.layers.moe_layer import MoELayer


def is_replica_local(variable):
    """Whether `variable` holds a different value on each replica (a shard)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return getattr(variable, "synchronization", None) == tf.VariableSynchronization.ON_READ


def _replica_local_creator(next_creator, **kwargs):
    # ON_READ: every replica keeps and updates its own copy, never synced.
    # Aggregation NONE makes a cross-replica read an error rather than a sum.
    kwargs["synchronization"] = tf.VariableSynchronization.ON_READ
    kwargs["aggregation"] = tf.VariableAggregation.NONE
    return next_creator(**kwargs)


def replica_local_variables():
    """Scope in which new variables are per-replica shards (ON_READ)."""
    return tf.variable_creator_scope(_replica_local_creator)


def _components(variable):
    variable = variable.value if isinstance(variable, keras.Variable) else variable
    return variable.distribute_strategy.experimental_local_results(variable)


def gather_shards(variable):
    """The full value of a variable: its shards concatenated on axis 0."""
    if not is_replica_local(variable):
        return keras.ops.convert_to_numpy(variable)
    return tf.concat(_components(variable), axis=0).numpy()


def assign_shards(variable, full_value):
    """Splits `full_value` on axis 0 over the shards of `variable`."""
    if not is_replica_local(variable):
        variable.assign(full_value)
        return
    components = _components(variable)
    local = components[0].shape[0] if components[0].shape.rank else None
    if local is None or full_value.shape[0] != local * len(components):
        raise ValueError(
            f"Cannot split a value of shape {full_value.shape} over {len(components)} "
            f"shards of shape {components[0].shape} ({variable.name})."
        )
    for shard, component in enumerate(components):
        component.assign(full_value[shard * local : (shard + 1) * local])


def _reseeded(initializer, shard):
    """`initializer` with its int seed moved by `shard`, so shards differ."""
    seed = getattr(initializer, "seed", None)
    if shard == 0 or not isinstance(seed, int):
        return initializer
    config = initializer.get_config()
    config["seed"] = seed + shard
    return type(initializer).from_config(config)


def _all_gather(context, value):
    """`value` [1, ...] of every replica, concatenated on axis 0.

    TensorFlow's collective gather has no bfloat16 kernel, so bfloat16
    values travel as float32 (exactly) and come back as bfloat16.
    """
    if value.dtype != tf.bfloat16:
        return context.all_gather(value, axis=0)
    return tf.cast(context.all_gather(tf.cast(value, tf.float32), axis=0), tf.bfloat16)


@keras.saving.register_keras_serializable(package="tf_moe")
class _ShardedExperts(FeedForwardExperts):
    """Expert bank of which each replica holds `num_experts` (its shard).

    Called in a replica context on that replica's full dispatch buffer
    [num_shards * num_experts, capacity, d]: the buffers of all replicas are
    exchanged so that each replica runs its own experts on the slots that
    every replica routed to them, then the outputs go back to the replicas
    their tokens came from. Saved and loaded as the full stacked bank, so a
    checkpoint restores onto any number of replicas.
    """

    def build(self, input_shape):
        strategy = tf.distribute.get_strategy()
        self.num_shards = strategy.num_replicas_in_sync
        if self.num_shards == 1:
            super().build(input_shape)
            return
        if len(strategy.extended.worker_devices) != self.num_shards:
            raise NotImplementedError(
                "Expert parallelism needs every replica on this worker (e.g. MirroredStrategy); "
                f"got {type(strategy).__name__} with {self.num_shards} replicas over "
                f"{len(strategy.extended.worker_devices)} local devices."
            )
        if not tf.distribute.in_cross_replica_context():
            raise RuntimeError(
                "Build ExpertParallelMoE under `strategy.scope()` (e.g. build the model "
                "before `fit`), not inside a replica function."
            )
        with replica_local_variables():
            super().build(input_shape)
        # The strategy copies replica 0's initial value to every replica.
        for variable, initializer in self._initializers():
            for shard, component in enumerate(_components(variable)):
                if shard:
                    init = _reseeded(initializer, shard)
                    component.assign(init(variable.shape, dtype=variable.dtype))

    def _initializers(self):
        pairs = [(self.kernel_in, self.kernel_initializer), (self.kernel_out, self.kernel_initializer)]
        if self.use_bias:
            pairs += [(self.bias_in, self.bias_initializer), (self.bias_out, self.bias_initializer)]
        return pairs

    def call(self, inputs):
        if self.num_shards == 1:
            return super().call(inputs)
        context = tf.distribute.get_replica_context()
        if context is None and in_symbolic_scope():
            # Keras traces the model for shapes only, outside any replica.
            return tf.zeros(tf.concat([tf.shape(inputs)[:-1], [self.output_units]], 0), self.compute_dtype)
        if context is None or context.num_replicas_in_sync != self.num_shards:
            raise RuntimeError(
                f"ExpertParallelMoE built for {self.num_shards} replicas must be called in "
                "their replica context (inside `fit`/`evaluate`/`predict` or `strategy.run`)."
            )
        shards, local = self.num_shards, self.num_experts
        units = inputs.shape[-1]
        capacity = inputs.shape[1]
        # At least one (zero) slot: TensorFlow's all-gather of an empty
        # tensor kills the process (an empty batch on every replica).
        if capacity is None or tf.executing_eagerly():
            # Dropless buffers differ per replica (and run eagerly, their
            # shapes are known): pad all to the largest.
            capacity = tf.shape(inputs)[1]
            padded_capacity = tf.maximum(tf.reduce_max(context.all_gather(capacity[None], axis=0)), 1)
        else:
            padded_capacity = max(capacity, 1)
        inputs = tf.pad(inputs, [[0, 0], [0, padded_capacity - capacity], [0, 0]])
        replica = context.replica_id_in_sync_group
        # [sources, owners, local, C, d]: tf.distribute has no all-to-all, so
        # every replica gathers all buffers and keeps its own experts' slots.
        sent = tf.reshape(inputs, [1, shards, local, padded_capacity, units])
        received = tf.gather(_all_gather(context, sent), replica, axis=1)
        # Each local expert runs once on the slots of all replicas.
        batch = tf.reshape(tf.transpose(received, [1, 0, 2, 3]), [local, -1, units])
        outputs = super().call(batch)
        out_units = outputs.shape[-1]
        outputs = tf.transpose(tf.reshape(outputs, [local, shards, padded_capacity, out_units]), [1, 0, 2, 3])
        returned = tf.gather(_all_gather(context, outputs[None]), replica, axis=1)
        returned = tf.reshape(returned, [shards * local, padded_capacity, out_units])
        return returned[:, :capacity]

    def save_own_variables(self, store):
        for i, variable in enumerate(self._trainable_variables + self._non_trainable_variables):
            store[f"{i}"] = gather_shards(variable)

    def load_own_variables(self, store):
        self._check_load_own_variables(store)
        for i, variable in enumerate(self._trainable_variables + self._non_trainable_variables):
            assign_shards(variable, store[f"{i}"][...])


@keras.saving.register_keras_serializable(package="tf_moe")
class ExpertParallelMoE(MoELayer):
    """MoE layer whose experts are sharded across data-parallel replicas.

    The mix of data and model parallelism of section 3.1: under a
    `tf.distribute` strategy with R replicas, the router and the rest of the
    model are replicated (data parallel) while each replica holds
    `num_experts / R` experts. In every step the per-replica dispatch
    buffers are exchanged with cross-replica all-gathers, so each expert
    runs once on the tokens routed to it from the whole global batch (a
    batch of about `k * B / n` for a global batch of B tokens instead of
    `k * B / (n R)`), and the outputs return to their replicas. With one
    replica it is exactly `MoELayer`. It works with every router, the
    hierarchical one included: routing happens on each replica before the
    exchange. Expert weights are per-replica (ON_READ)
    variables: train with an optimizer wrapped by
    `tf_moe.distribute.expert_parallel_optimizer`, which leaves their
    gradients local instead of summing them over replicas. Weights are
    saved as the full `[num_experts, ...]` bank, so they load onto any
    replica count and into `MoELayer`.

    Args:
        Those of `MoELayer`; `num_experts` must be a multiple of the number
        of replicas of the strategy in scope when the layer is built.

    Call arguments:
        As `MoELayer`, inside a replica context when there are several
        replicas (`fit`, `evaluate`, `predict`, `strategy.run`).

    Returns:
        As `MoELayer`.

    Example:

    >>> strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    >>> with strategy.scope():
    ...     inputs = keras.Input((16,))
    ...     outputs = ExpertParallelMoE(num_experts=4, k=2, hidden_units=32)(inputs)
    ...     model = keras.Model(inputs, outputs)
    ...     model.compile(expert_parallel_optimizer(keras.optimizers.Adam()), "mse")
    """

    experts_class = _ShardedExperts

    def _build_experts(self, num_experts, input_units):
        shards = tf.distribute.get_strategy().num_replicas_in_sync
        if num_experts % shards:
            raise ValueError(
                f"`num_experts` ({num_experts}) must be a multiple of the number of "
                f"replicas ({shards}) for expert parallelism."
            )
        return super()._build_experts(num_experts // shards, input_units)
