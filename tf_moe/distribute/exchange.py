"""Sending expert dispatch buffers between replicas (Shazeer et al. 2017, section 3.1).

Under expert parallelism each replica routes its own tokens into a buffer
with one row per replica (the slots of the experts that replica holds).
`exchange` sends row `i` to replica `i` and returns, in row `i`, what
replica `i` sent: an all-to-all. Its gradient is the same exchange of the
incoming gradients, so the backward pass costs what the forward pass does.

Two implementations:

* `"all_to_all"`: a true all-to-all, each row crosses the network once.
  TensorFlow's collective all-to-all (`CollectiveAllToAllV2`) under
  MirroredStrategy and MultiWorkerMirroredStrategy (CPU and GPU, one
  worker or many), XLA's `AllToAll` under TPUStrategy.
* `"all_gather"`: every replica gathers every replica's whole buffer and
  keeps its own rows, built from `ReplicaContext.all_gather` alone, which
  every strategy has. Each replica sends its buffer to all others:
  `replicas` times the traffic of the all-to-all.

`"auto"` takes the all-to-all wherever the strategy has one.
"""

from typing import NamedTuple, Optional

import tensorflow as tf

from tf_moe import _internals

EXCHANGES = ("auto", "all_to_all", "all_gather")


class Traffic(NamedTuple):
    """The bytes one replica sent to other replicas in one exchange.

    Fields:
        method: `"all_to_all"` or `"all_gather"`.
        replica: the sending replica's id in the sync group (None where
            it is not known when the step is traced, e.g. on TPUs).
        direction: `"forward"` (tokens or expert outputs) or `"backward"`
            (their gradients).
        bytes_sent: bytes of the tensor handed to the collective that leave
            this replica (its own row stays), None for a shape known only
            when the step runs (the dropless path).
    """

    method: str
    replica: Optional[int]
    direction: str
    bytes_sent: Optional[int]


class TrafficRecorder:
    """Collects the `Traffic` of the exchanges it is passed to, as they are traced.

    The exchanges of a step are recorded when the step function is traced
    (e.g. by the first `fit` step), one entry per replica, direction and
    exchange, with bytes counted from the static shape and dtype of the
    tensor sent. A traced step runs each of them once, so the entries of
    one trace are the traffic of one step. Pass it to `exchange(...,
    traffic=recorder)`, or set `ExpertParallelMoE.traffic` before the step
    is traced. Iterating over it gives the entries.

    Example:

    >>> traffic = TrafficRecorder()
    >>> layer.traffic = traffic  # an ExpertParallelMoE
    >>> model.fit(x, y, epochs=1, steps_per_epoch=1)  # doctest: +SKIP
    >>> sum(t.bytes_sent for t in traffic if t.replica == 0)  # doctest: +SKIP
    """

    def __init__(self):
        self.entries = []

    def __iter__(self):
        return iter(list(self.entries))

    def __len__(self):
        return len(self.entries)

    def record(self, method, replica, direction, tensor, num_replicas):
        """Appends the `Traffic` of sending `tensor` [replicas, ...] by `method`."""
        size = tensor.shape.num_elements()
        if size is None:
            sent = None
        elif method == "all_to_all":
            sent = size * tensor.dtype.size * (num_replicas - 1) // num_replicas
        else:
            sent = size * tensor.dtype.size * (num_replicas - 1)
        # One trace per replica thread: list.append is atomic.
        self.entries.append(Traffic(method, replica, direction, sent))


def _is_tpu(strategy):
    return isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy))


def has_all_to_all(strategy):
    """Whether `exchange(..., "all_to_all")` works under `strategy`."""
    return _is_tpu(strategy) or _internals.has_collective_launchers(strategy)


def resolve_exchange(strategy, method):
    """The implementation `method` (one of `EXCHANGES`) means under `strategy`.

    Raises:
        ValueError: for an unknown `method`, or `"all_to_all"` under a
            strategy without one.
    """
    if method not in EXCHANGES:
        raise ValueError(f"`exchange` must be one of {EXCHANGES}, got {method!r}.")
    if method == "all_gather":
        return method
    available = has_all_to_all(strategy)
    if method == "auto":
        return "all_to_all" if available else "all_gather"
    if not available:
        raise ValueError(
            f"exchange='all_to_all' needs MirroredStrategy, MultiWorkerMirroredStrategy or "
            f"TPUStrategy; {type(strategy).__name__} has no all-to-all. Use exchange='all_gather'."
        )
    return method


def exchange(tensor, method="auto", traffic=None):
    """All-to-all of `tensor` [replicas, ...] in a replica context.

    Row `i` of each replica's `tensor` goes to replica `i`; row `i` of the
    result is what replica `i` sent to this one. Differentiable: the
    gradient is the exchange of the incoming gradient.

    Args:
        tensor: [replicas, ...] with the same shape on every replica.
        method: one of `EXCHANGES` (see the module docstring).
        traffic: optional `TrafficRecorder` that records what the exchange
            sends, forward and backward.

    Returns:
        A tensor of the shape and dtype of `tensor`.
    """
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError("`exchange` must be called in a replica context.")
    strategy = context.strategy
    replicas = context.num_replicas_in_sync
    if tensor.shape.rank is None or tensor.shape[0] not in (None, replicas):
        raise ValueError(f"`tensor` must have {replicas} rows (one per replica), got shape {tensor.shape}.")
    method = resolve_exchange(strategy, method)
    if tf.executing_eagerly() and method == "all_to_all" and not _is_tpu(strategy):
        # `strategy.run` outside a tf.function: the replicas' eager all-to-all
        # launches do not meet (the test run hangs); the all-gather's do.
        method = "all_gather"
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    replica = None if replica is None else int(replica)

    if method == "all_gather":
        def send(x):
            gathered = context.all_gather(x[None], axis=0)  # [sources, replicas, ...]
            return tf.gather(gathered, context.replica_id_in_sync_group, axis=1)
    elif _is_tpu(strategy):
        def send(x):
            group = tf.range(replicas, dtype=tf.int32)[None]
            return tf.raw_ops.AllToAll(
                input=x, group_assignment=group, concat_dimension=0, split_dimension=0, split_count=replicas
            )
    else:
        launcher = _internals.collective_launcher(strategy, replica)

        def send(x):
            return _internals.launch_all_to_all(launcher, x)

    if tensor.dtype == tf.bfloat16 and not _is_tpu(strategy):
        # TensorFlow's CPU/GPU collectives have no bfloat16 kernel: travel as
        # float32 (exactly) and come back as bfloat16.
        return tf.cast(exchange(tf.cast(tensor, tf.float32), method, traffic), tf.bfloat16)

    @tf.custom_gradient
    def exchanged(x):
        if traffic is not None:
            traffic.record(method, replica, "forward", x, replicas)

        def gradient(upstream):
            # The gradient has the forward tensor's shape, static or not.
            upstream = tf.ensure_shape(upstream, x.shape)
            if traffic is not None:
                traffic.record(method, replica, "backward", upstream, replicas)
            return send(upstream)

        return send(x), gradient

    return exchanged(tensor)
