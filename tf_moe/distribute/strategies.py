"""Picking a tf.distribute strategy by name."""

import itertools
import json
import os

import tensorflow as tf

from tf_moe import _internals

STRATEGY_NAMES = ("auto", "default", "mirrored", "multiworker", "tpu")


def get_strategy(name="auto", tpu=None, devices=None):
    """Returns a `tf.distribute.Strategy` for a short name.

    Args:
        name: one of
            `"auto"`: a TPU if one is reachable (set `tpu` or the
            `TPU_NAME` environment variable), else multi-worker when
            `TF_CONFIG` names more than one worker, else mirrored over every
            local GPU when there are two or more, else the default strategy;
            `"default"`: the no-op default strategy (one device);
            `"mirrored"`: `MirroredStrategy` over all local GPUs (or the
            local CPU devices when there is no GPU);
            `"multiworker"`: `MultiWorkerMirroredStrategy`, configured by the
            `TF_CONFIG` environment variable of each worker;
            `"tpu"`: `TPUStrategy` on the TPU named by `tpu` (`"local"` for a
            TPU VM, a name or a `grpc://` address); raises `RuntimeError` when
            none is reachable.
        tpu: optional TPU name or address for `"tpu"` and `"auto"`.
        devices: optional device names: for `"mirrored"` the devices to
            use (e.g. `["/cpu:0", "/cpu:1"]` on logical CPU devices); for
            `"multiworker"` the local devices of every worker (by default
            all its GPUs, else its one CPU: MultiWorkerMirroredStrategy
            runs a single replica per CPU-only worker otherwise; e.g.
            `["/cpu:0", "/cpu:1"]` on logical CPU devices gives two).

    Returns:
        A `tf.distribute.Strategy`; build and compile models under its
        `scope()`.

    Example:

    >>> strategy = get_strategy("default")
    >>> strategy.num_replicas_in_sync
    1
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(f"`name` must be one of {STRATEGY_NAMES}, got {name!r}.")
    if name == "auto":
        return _auto_strategy(tpu)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if devices is None:
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return _MirroredStrategy(devices)
    if name == "multiworker":
        return _MultiWorkerMirroredStrategy(devices)
    return tf.distribute.TPUStrategy(_connect_tpu(tpu))


class _MirroredStrategy(tf.distribute.MirroredStrategy):
    """MirroredStrategy with collective keys of its own.

    Every MirroredStrategy numbers its collective groups and instances from
    the same start, and the runtime caches what it resolved for a key. A
    second strategy in the same process (2 then 4 logical CPUs, or the same
    devices with other shapes: tests, benchmarks, a notebook) then aborts
    ("joining a group with size 4, but that group has size 2", "Shape
    mismatch in the collective instance"). A fresh key range per strategy
    avoids it.
    """

    _instances = itertools.count(1)

    def __init__(self, devices):
        self._collective_key_base = 100_000 * next(self._instances)
        super().__init__(devices)


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose `reduce` takes what Keras's `fit` passes.

    Keras 3 `fit` under this strategy calls `reduce` with a whole nested
    (x, y) batch to build its metrics ("Attempt to convert a value
    (PerReplica ...) to a Tensor"), and with `axis=0` on the scalar logs of
    every step ("Invalid reduction dimension 0 for input with 0
    dimensions"). Each leaf is reduced on its own, and a scalar over the
    replicas only.

    Args:
        local_devices: optional device names of each worker's replicas
            (default: the strategy's own choice).
    """

    def __init__(self, local_devices=None):
        if not local_devices:
            super().__init__()
            return
        _internals.init_multi_worker_strategy(
            self, local_devices, tf.distribute.experimental.CommunicationOptions()
        )

    def reduce(self, reduce_op, value, axis=None):
        reduce_one = super().reduce

        def reduce_leaf(leaf):
            local = self.experimental_local_results(leaf)[0]
            leaf_axis = None if getattr(local, "shape", None) is not None and local.shape.rank == 0 else axis
            return reduce_one(reduce_op, leaf, leaf_axis)

        return tf.nest.map_structure(reduce_leaf, value)


def _auto_strategy(tpu):
    if tpu or os.environ.get("TPU_NAME"):
        return get_strategy("tpu", tpu=tpu)
    workers = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {}).get("worker", [])
    if len(workers) > 1:
        return get_strategy("multiworker")
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return get_strategy("mirrored")
    return get_strategy("default")


def _connect_tpu(tpu):
    """Connects to a TPU system, with an error that says what was tried."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise RuntimeError(
            f"No TPU is reachable (tpu={tpu!r}, TPU_NAME={os.environ.get('TPU_NAME')!r}): "
            f"{error}. Run on a TPU VM with tpu='local', or pass the TPU's name or "
            "grpc:// address; use get_strategy('auto') to fall back to CPUs/GPUs."
        ) from error
    return resolver
