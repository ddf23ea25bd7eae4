"""One worker of the multi-worker expert-parallel tests (run by tests/cluster.py).

    python tests/cluster_worker.py SCENARIO LOCAL_DEVICES WORKDIR

Builds `model()` with `ExpertParallelMoE` under MultiWorkerMirroredStrategy
(TF_CONFIG from the environment) over LOCAL_DEVICES logical CPUs of this
process, loads WORKDIR/init.weights.h5 (saved by the test from the
single-device model) and feeds it WORKDIR/data.npz in global batches of
`GLOBAL_BATCH` rows, replica r taking rows r*b...(r+1)*b-1 of each.

SCENARIO "match": `STEPS` steps of SGD with momentum, then the outputs on
the first global batch (via `strategy.run`, gathered in row order); then a
model compiled with the same SGD unwrapped must refuse to train (its
error goes in the results).

SCENARIO "resume": `EPOCHS` epochs of `STEPS` steps with a `ClusterBackup`
in WORKDIR/backup, resumed from it when there is one. Worker 1 marks the
end of each epoch with WORKDIR/worker1-epoch<N> and sleeps after each
step, so the test can kill it mid-training.

Both end with a cluster checkpoint, WORKDIR/trained.weights.h5, and the
chief's WORKDIR/results.npz (replica count, fit logs, outputs, the epoch
the run started at).
"""

import os
import sys
import time

D, N, K = 6, 4, 2
GLOBAL_BATCH = 16
EPOCHS, STEPS = 4, 3


def model(layer_cls, optimizer):
    """Dense -> MoE -> Dense, a noise-free router: the same maths on any layout."""
    import keras

    import tf_moe

    keras.utils.set_random_seed(1)
    inputs = keras.Input((3, D))
    hidden = keras.layers.Dense(D, name="embed")(inputs)
    hidden = layer_cls(hidden_units=8, router=tf_moe.NoisyTopKRouter(N, K, noisy=False), name="moe")(hidden)
    built = keras.Model(inputs, keras.layers.Dense(D, name="head")(hidden))
    built.compile(optimizer, "mse")
    return built


def optimizer(scenario):
    """SGD with momentum for "match": its update scales with the gradient, so a
    gradient summed over the wrong replicas shows (Adam's first step would
    hide it). Adam for "resume"."""
    import keras

    if scenario == "match":
        return keras.optimizers.SGD(0.1, momentum=0.9)
    return keras.optimizers.Adam(0.05)


def _distributed(strategy, x, y, steps):
    """Global batch s of the test is rows s*B ... (s+1)*B-1; replica r gets its r-th slice."""
    import numpy as np
    import tensorflow as tf

    def dataset(context):
        per_replica = context.get_per_replica_batch_size(GLOBAL_BATCH)
        local = context.num_replicas_in_sync // context.num_input_pipelines
        first = context.input_pipeline_id * local
        # A worker's dataset feeds its replicas in turn.
        rows = [
            step * GLOBAL_BATCH + (first + replica) * per_replica + i
            for step in range(steps)
            for replica in range(local)
            for i in range(per_replica)
        ]
        # Repeated: `fit` with `steps_per_epoch` keeps one iterator over all epochs.
        return tf.data.Dataset.from_tensor_slices((x[rows], y[rows])).batch(per_replica).repeat()

    assert len(x) >= steps * GLOBAL_BATCH and np.shape(x)[0] == np.shape(y)[0]
    return strategy.distribute_datasets_from_function(dataset)


def _outputs(strategy, built, x):
    """The model's outputs on the global batch `x` in row order, computed by the replicas."""
    import tensorflow as tf

    per_replica = len(x) // strategy.num_replicas_in_sync
    inputs = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(
            x[context.replica_id_in_sync_group * per_replica : (context.replica_id_in_sync_group + 1) * per_replica]
        )
    )
    outputs = tf.function(lambda batch: strategy.run(built, args=(batch,)))(inputs)
    return strategy.gather(outputs, axis=0).numpy()


def _plain_optimizer_error(strategy, x, y):
    """What `fit` says when the optimizer is not wrapped ("" if it trains)."""
    from tf_moe.distribute import ExpertParallelMoE

    with strategy.scope():
        plain = model(ExpertParallelMoE, optimizer("match"))
    try:
        plain.fit(_distributed(strategy, x, y, 1), epochs=1, steps_per_epoch=1, verbose=0)
    except ValueError as error:
        return str(error)
    return ""


def _kill_marker(workdir):
    """Worker 1's callback: marks each finished epoch, and slows steps down."""
    import keras

    class KillMarker(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.5)

        def on_epoch_end(self, epoch, logs=None):
            open(os.path.join(workdir, f"worker1-epoch{epoch + 1}"), "w").close()

    return KillMarker()


def main(scenario, local_devices, workdir):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * local_devices)

    import numpy as np

    from tf_moe.distribute import ClusterBackup, ExpertParallelMoE, expert_parallel_optimizer, get_strategy, save_weights
    from tf_moe.distribute.checkpoints import is_chief

    devices = [f"/cpu:{i}" for i in range(local_devices)] if local_devices > 1 else None
    strategy = get_strategy("multiworker", devices=devices)
    task = strategy.cluster_resolver.task_id
    with strategy.scope():
        built = model(ExpertParallelMoE, expert_parallel_optimizer(optimizer(scenario)))
    built.load_weights(os.path.join(workdir, "init.weights.h5"))
    data = np.load(os.path.join(workdir, "data.npz"))
    x, y = data["x"], data["y"]
    results = {"replicas": strategy.num_replicas_in_sync}

    if scenario == "match":
        steps, epochs, callbacks, initial_epoch = STEPS, 1, [], 0
    elif scenario == "resume":
        backup = ClusterBackup(os.path.join(workdir, "backup"))
        initial_epoch = results["initial_epoch"] = backup.initial_epoch
        print(f"worker {task} starts at epoch {initial_epoch}", flush=True)
        steps, epochs = STEPS, EPOCHS
        callbacks = [backup] + ([_kill_marker(workdir)] if task == 1 else [])
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    history = built.fit(
        _distributed(strategy, x, y, steps), epochs=epochs, steps_per_epoch=steps,
        initial_epoch=initial_epoch, callbacks=callbacks, verbose=0,
    ).history
    results["loss"], results["aux_loss"] = history.get("loss", []), history.get("moe_aux_loss", [])
    results["outputs"] = _outputs(strategy, built, x[:GLOBAL_BATCH])
    save_weights(built, os.path.join(workdir, "trained.weights.h5"))
    if scenario == "match":
        results["plain_error"] = _plain_optimizer_error(strategy, x, y)
    if is_chief(strategy):
        np.savez(os.path.join(workdir, "results.npz"), **results)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
