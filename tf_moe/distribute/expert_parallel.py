"""Expert parallelism: each expert lives on one replica (Shazeer et al. 2017, section 3.1)."""

import contextlib

import keras
import tensorflow as tf

from tf_moe import _internals
from tf_moe.distribute.exchange import EXCHANGES, exchange, resolve_exchange
from tf_moe.layers import legacy
from tf_moe.layers.feed_forward_experts import FeedForwardExperts
from tf_moe.layers.moe_layer import MoELayer

# Strategies whose replicas can each hold a shard (replica-local variables
# and replica-context collectives).
_SHARDING_STRATEGIES = (
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
    tf.distribute.TPUStrategy,
    tf.distribute.experimental.TPUStrategy,
)


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def is_replica_local(variable):
    """Whether `variable` holds a different value on each replica (a shard)."""
    return getattr(_tf_variable(variable), "synchronization", None) == tf.VariableSynchronization.ON_READ


def _replica_local_creator(next_creator, **kwargs):
    # ON_READ: every replica keeps and updates its own copy, never synced.
    # Aggregation NONE makes a cross-replica read an error rather than a sum.
    kwargs["synchronization"] = tf.VariableSynchronization.ON_READ
    kwargs["aggregation"] = tf.VariableAggregation.NONE
    return next_creator(**kwargs)


def replica_local_variables():
    """Scope in which new variables are per-replica shards (ON_READ)."""
    return tf.variable_creator_scope(_replica_local_creator)


def _strategy_of(variable):
    return _tf_variable(variable).distribute_strategy


def _components(variable):
    """This worker's per-replica components of a variable."""
    return _strategy_of(variable).experimental_local_results(_tf_variable(variable))


def shard_ids(strategy):
    """The global shard index of each of this worker's replicas.

    A replica's shard index is its `replica_id_in_sync_group`: replica `r`
    of the whole cluster holds experts `r * m ... (r + 1) * m - 1`. Listed
    in the order of the local components of a replica-local variable.
    """
    ids = strategy.experimental_distribute_values_from_function(
        lambda context: context.replica_id_in_sync_group
    )
    return [int(i) for i in strategy.experimental_local_results(ids)]


def gather_shards(variable):
    """The full value of a variable: the shards of all replicas on axis 0.

    Shards held by other workers are gathered with a collective, so under
    MultiWorkerMirroredStrategy every worker must call this (as every
    worker calls `save_weights`).
    """
    return gather_all_shards([variable])[0]


def gather_all_shards(variables):
    """`gather_shards` of each of `variables`, with one collective per dtype.

    Returns:
        A list of numpy arrays, one per variable.
    """
    values = [None] * len(variables)
    remote = {}  # dtype -> indices of variables with shards on other workers
    for index, variable in enumerate(variables):
        if not is_replica_local(variable):
            values[index] = keras.ops.convert_to_numpy(variable)
            continue
        strategy = _strategy_of(variable)
        components = _components(variable)
        if len(components) == strategy.num_replicas_in_sync:
            ids = shard_ids(strategy)
            values[index] = tf.concat([components[ids.index(i)] for i in range(len(ids))], axis=0).numpy()
        else:
            remote.setdefault(variable.dtype, []).append(index)
    for indices in remote.values():
        gathered = _gather_flat([variables[i] for i in indices])
        for index, value in zip(indices, gathered):
            values[index] = value
    return values


def _gather_flat(variables):
    """Full values of replica-local variables of one dtype, in one `strategy.gather`."""
    strategy = _strategy_of(variables[0])
    components = [_components(v) for v in variables]
    ids = shard_ids(strategy)

    def local_flat(context):
        replica = ids.index(context.replica_id_in_sync_group)
        return tf.concat([tf.reshape(c[replica], [-1]) for c in components], axis=0)

    flat = strategy.gather(strategy.experimental_distribute_values_from_function(local_flat), axis=0)
    per_replica = tf.split(flat, strategy.num_replicas_in_sync)
    sizes = [c[0].shape.num_elements() for c in components]
    shards = [tf.split(replica, sizes) for replica in per_replica]
    return [
        tf.concat([tf.reshape(shard[i], c[0].shape) for shard in shards], axis=0).numpy()
        for i, c in enumerate(components)
    ]


def assign_shards(variable, full_value):
    """Splits `full_value` on axis 0 over the shards of `variable` (this worker's)."""
    if not is_replica_local(variable):
        variable.assign(full_value)
        return
    strategy = _strategy_of(variable)
    components = _components(variable)
    shards = strategy.num_replicas_in_sync
    local = components[0].shape[0] if components[0].shape.rank else None
    if local is None or full_value.shape[0] != local * shards:
        raise ValueError(
            f"Cannot split a value of shape {full_value.shape} over {shards} "
            f"shards of shape {components[0].shape} ({variable.name})."
        )
    for shard, component in zip(shard_ids(strategy), components):
        component.assign(full_value[shard * local : (shard + 1) * local])


class ShardGuard:
    """The constraint of an expert shard: stops optimizers that would sum its gradient.

    Keras optimizers sum every gradient over the replicas, which for a
    shard adds the gradients of different experts together. Every Keras
    optimizer applies the constraints of the variables it updates while it
    builds its step, so this raises then: under `fit` or any `tf.function`
    before a step has run. The optimizers of `expert_parallel_optimizer`,
    which keep shard gradients local, lift it while they build their step.
    """

    def __init__(self, variable):
        self.variable = variable
        self._lifts = 0

    def __call__(self, value):
        raise ValueError(
            f"`optimizer`: {self.variable.path} is a shard of ExpertParallelMoE's experts, and this "
            "optimizer sums every gradient over the replicas, which would add different experts' "
            "gradients together. Compile with `tf_moe.distribute.expert_parallel_optimizer(optimizer)`."
        )

    @contextlib.contextmanager
    def lifted(self):
        """No constraint on the shard inside the block."""
        # Counted: under MirroredStrategy the replicas' threads build their
        # steps interleaved, each inside its own block.
        self._lifts += 1
        self.variable.constraint = None
        try:
            yield
        finally:
            self._lifts -= 1
            if not self._lifts:
                self.variable.constraint = self


def _reseeded(initializer, shard):
    """`initializer` with its int seed moved by `shard`, so shards differ."""
    seed = getattr(initializer, "seed", None)
    if shard == 0 or not isinstance(seed, int):
        return initializer
    config = initializer.get_config()
    config["seed"] = seed + shard
    return type(initializer).from_config(config)


@keras.saving.register_keras_serializable(package="tf_moe")
class _ShardedExperts(FeedForwardExperts):
    """Expert bank of which each replica holds `num_experts` (its shard).

    Called in a replica context on that replica's full dispatch buffer
    [num_shards * num_experts, capacity, d]: the buffers are exchanged
    (`tf_moe.distribute.exchange`) so that each replica runs its own
    experts once on the slots that every replica of the cluster routed to
    them, then the outputs go back to the replicas their tokens came from.
    Replica `r` (its `replica_id_in_sync_group`, over all workers) holds
    shard `r`. Saved and loaded as the full stacked bank, so a checkpoint
    restores onto any number of replicas and workers.
    """

    # How buffers travel between replicas, one of `exchange.EXCHANGES`, and
    # the optional `TrafficRecorder` of the exchanges; set by ExpertParallelMoE.
    exchange = "auto"
    traffic = None
    # One buffer per call: `call` exchanges it whole (no split buffers).
    overflow_cost = None

    def build(self, input_shape):
        strategy = tf.distribute.get_strategy()
        self.num_shards = strategy.num_replicas_in_sync
        if self.num_shards == 1:
            super().build(input_shape)
            return
        if not isinstance(strategy, _SHARDING_STRATEGIES):
            raise NotImplementedError(
                "Expert parallelism needs MirroredStrategy, MultiWorkerMirroredStrategy or "
                f"TPUStrategy; got {type(strategy).__name__} with {self.num_shards} replicas."
            )
        if not tf.distribute.in_cross_replica_context():
            raise RuntimeError(
                "Build ExpertParallelMoE under `strategy.scope()` (e.g. build the model "
                "before `fit`), not inside a replica function."
            )
        with replica_local_variables():
            super().build(input_shape)
        for variable in self.trainable_weights:
            variable.constraint = ShardGuard(variable)
        # The strategy copies replica 0's initial value to every replica.
        ids = shard_ids(strategy)
        for variable, initializer in self._initializers():
            for shard, component in zip(ids, _components(variable)):
                if shard:
                    init = _reseeded(initializer, shard)
                    component.assign(init(variable.shape, dtype=variable.dtype))

    def _initializers(self):
        return [
            (v, self.kernel_initializer if v.name.startswith("kernel") else self.bias_initializer)
            for v in self.weights
        ]

    def call(self, inputs):
        if self.num_shards == 1:
            return super().call(inputs)
        context = tf.distribute.get_replica_context()
        if context is None and _internals.in_symbolic_scope():
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
        # At least one (zero) slot: TensorFlow's collective gather of an
        # empty tensor kills the process (an empty batch on every replica).
        if capacity is None or tf.executing_eagerly():
            # Dropless buffers differ per replica (and run eagerly, their
            # shapes are known): pad all to the largest.
            capacity = tf.shape(inputs)[1]
            padded_capacity = tf.maximum(tf.reduce_max(context.all_gather(capacity[None], axis=0)), 1)
        else:
            padded_capacity = max(capacity, 1)
        inputs = tf.pad(inputs, [[0, 0], [0, padded_capacity - capacity], [0, 0]])
        # [owners, local, C, d] -> [sources, local, C, d]: every replica's
        # slots of this replica's experts.
        received = exchange(
            tf.reshape(inputs, [shards, local, padded_capacity, units]), self.exchange, self.traffic
        )
        # Each local expert runs once on the slots of all replicas.
        batch = tf.reshape(tf.transpose(received, [1, 0, 2, 3]), [local, -1, units])
        outputs = super().call(batch)
        out_units = outputs.shape[-1]
        outputs = tf.transpose(tf.reshape(outputs, [local, shards, padded_capacity, out_units]), [1, 0, 2, 3])
        # [sources, local, C, o] -> [owners, local, C, o]: back where the tokens came from.
        returned = exchange(outputs, self.exchange, self.traffic)
        returned = tf.reshape(returned, [shards * local, padded_capacity, out_units])
        return returned[:, :capacity]

    def save_own_variables(self, store):
        for i, value in enumerate(gather_all_shards(_internals.own_variables(self))):
            store[f"{i}"] = value

    def load_own_variables(self, store):
        _internals.check_load_own_variables(self, store)
        for i, variable in enumerate(_internals.own_variables(self)):
            assign_shards(variable, store[f"{i}"][...])


@keras.saving.register_keras_serializable(package="tf_moe")
class ExpertParallelMoE(MoELayer):
    """MoE layer whose experts are sharded across data-parallel replicas.

    The mix of data and model parallelism of section 3.1: under a
    `tf.distribute` strategy with R replicas (on one worker or many), the
    router and the rest of the model are replicated (data parallel) while
    each replica holds `num_experts / R` experts, each expert on exactly
    one replica of the cluster. In every step each replica sends the slots
    it routed to an expert to that expert's replica and gets the outputs
    back (an all-to-all each way), so each expert runs once on the tokens
    routed to it from the whole global batch (a batch of about `k * B / n`
    for a global batch of B tokens instead of `k * B / (n R)`). With one
    replica it is exactly `MoELayer`. It works with every router, the
    hierarchical one included: routing happens on each replica before the
    exchange, and the balancing losses are those of the global batch.
    Expert weights are per-replica (ON_READ) variables: train with an
    optimizer wrapped by `tf_moe.distribute.expert_parallel_optimizer`,
    which leaves their gradients local instead of summing them over
    replicas; any other optimizer stops with a ValueError when it builds
    its first step (`ShardGuard`), before the step runs. Weights are saved as the full `[num_experts, ...]` bank, so
    they load onto any number of replicas and workers and into `MoELayer`.

    Args:
        *args, **kwargs: those of `MoELayer`; `num_experts` must be a
            multiple of the number of replicas of the strategy in scope
            when the layer is built.
        exchange: how dispatch buffers travel between replicas:
            `"all_to_all"` (each slot crosses the network once: TensorFlow's
            collective all-to-all under MirroredStrategy and
            MultiWorkerMirroredStrategy, XLA's under TPUStrategy),
            `"all_gather"` (every replica gathers all buffers: `replicas`
            times the traffic, but only needs `all_gather`), or `"auto"`
            (the all-to-all where the strategy has one).

    Attributes:
        traffic: None, or a `tf_moe.distribute.exchange.TrafficRecorder`
            that records the bytes of the exchanges when the steps are
            traced (set it before the first step).

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

    def __init__(self, *args, exchange="auto", **kwargs):
        if kwargs.get("experts") is not None:
            raise ValueError(
                "`experts`: ExpertParallelMoE shards FeedForwardExperts (plain or gated, from "
                "`hidden_units`, `activation` and `gated`), not a bank of your own."
            )
        super().__init__(*args, **kwargs)
        if exchange not in EXCHANGES:
            raise ValueError(f"`exchange` must be one of {EXCHANGES}, got {exchange!r}.")
        self.exchange = exchange
        self._traffic = None

    @property
    def traffic(self):
        """The `TrafficRecorder` of this layer's exchanges, or None."""
        return self._traffic

    @traffic.setter
    def traffic(self, recorder):
        self._traffic = recorder
        if self.built:
            self.experts.traffic = recorder

    def _build_experts(self, num_experts, input_units):
        strategy = tf.distribute.get_strategy()
        shards = strategy.num_replicas_in_sync
        if num_experts % shards:
            raise ValueError(
                f"`num_experts` ({num_experts}) must be a multiple of the number of "
                f"replicas ({shards}) for expert parallelism."
            )
        if shards > 1:
            resolve_exchange(strategy, self.exchange)  # an unavailable one fails now
        experts = super()._build_experts(num_experts // shards, input_units)
        experts.exchange = self.exchange
        experts.traffic = self._traffic
        return experts

    def get_config(self):
        config = super().get_config()
        config["exchange"] = self.exchange
        return config

    @classmethod
    def from_config(cls, config):
        # tf_moe 0.1 configs name a gate instead of a router.
        return super().from_config(legacy.router_config(config))
