"""Expert parallelism across real worker processes on 127.0.0.1.

Two workers with TF_CONFIG run `ExpertParallelMoE` under
MultiWorkerMirroredStrategy (tests/cluster_worker.py), with two logical
CPU devices each (4 replicas, each holding one of the 4 experts) and with
one. The reference is the single-device `MoELayer` with the same weights
on the same global batches: losses, auxiliary losses, the weights and
momentum after three steps of SGD with momentum and the outputs must be
equal, an unwrapped SGD must refuse to train, the cluster's checkpoint must restore onto one and
two local replicas, and a run whose worker is killed must stop with an
error and resume from its backup to the weights of an uninterrupted run.
"""

import os
import time

import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import cluster, cluster_worker
from tests.cluster_worker import EPOCHS, GLOBAL_BATCH, STEPS
from tests.layer_test_case import randomise_weights
from tf_moe.distribute import ExpertParallelMoE, expert_parallel_optimizer, get_strategy
from tf_moe.distribute.expert_parallel import gather_shards


def _prepare(workdir, scenario):
    """The single-device reference, its initial weights and the data, for the workers."""
    reference = cluster_worker.model(tf_moe.MoELayer, cluster_worker.optimizer(scenario))
    # A random router and embedding: tokens spread over the experts of every replica.
    randomise_weights(reference.get_layer("moe").router, seed=0, scale=1.0)
    randomise_weights(reference.get_layer("embed"), seed=1, scale=1.0)
    # Keras names a weights file's layers by class: the file is that of the
    # same model with ExpertParallelMoE on one device (1 worker x 1 replica).
    single = cluster_worker.model(ExpertParallelMoE, cluster_worker.optimizer(scenario))
    single.set_weights(reference.get_weights())
    single.save_weights(str(workdir / "init.weights.h5"))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((STEPS * GLOBAL_BATCH, 3, cluster_worker.D)).astype("float32")
    y = rng.standard_normal(x.shape).astype("float32")
    np.savez(workdir / "data.npz", x=x, y=y)
    return reference, x, y


def _commands(scenario, local_devices, workdir):
    return [["tests/cluster_worker.py", scenario, str(local_devices), str(workdir)]] * 2


def _restore(path, replicas, scenario):
    """The cluster's checkpoint in a model on one worker with `replicas` replicas."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:replicas]]
    with get_strategy("mirrored", devices=devices).scope():
        restored = cluster_worker.model(
            ExpertParallelMoE, expert_parallel_optimizer(cluster_worker.optimizer(scenario))
        )
        restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(str(path))
    assert restored.get_layer("moe").experts.num_experts == cluster_worker.N // replicas
    return restored


def _assert_same_state(restored, reference):
    """Weights and optimizer state (full expert banks) equal the reference's."""
    for weight, expected in zip(restored.weights, reference.weights):
        np.testing.assert_allclose(gather_shards(weight), expected.numpy(), rtol=1e-4, atol=1e-6, err_msg=expected.path)
    for slot, expected in zip(restored.optimizer.variables, reference.optimizer.variables):
        np.testing.assert_allclose(gather_shards(slot), np.asarray(expected), rtol=1e-4, atol=1e-7, err_msg=slot.path)


@pytest.mark.parametrize("local_devices", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_two_workers_equal_the_single_device_layer(tmp_path, local_devices):
    """Losses, three SGD steps and outputs; the checkpoint onto 1 x 1 and 1 x 2 (and from 1 x 1);
    an unwrapped optimizer refuses to train."""
    reference, x, y = _prepare(tmp_path, "match")
    cluster.run_cluster(_commands("match", local_devices, tmp_path), tmp_path, timeout=500)
    got = np.load(tmp_path / "results.npz")
    assert int(got["replicas"]) == 2 * local_devices
    history = reference.fit(
        x[: STEPS * GLOBAL_BATCH], y[: STEPS * GLOBAL_BATCH], batch_size=GLOBAL_BATCH, epochs=1,
        shuffle=False, verbose=0,
    ).history
    assert history["moe_aux_loss"][0] > 1e-3  # unbalanced routing: a loss that can differ
    np.testing.assert_allclose(got["loss"], history["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["aux_loss"], history["moe_aux_loss"], rtol=1e-5)
    batch = x[:GLOBAL_BATCH]
    expected = reference.predict(batch, batch_size=GLOBAL_BATCH, verbose=0)
    np.testing.assert_allclose(got["outputs"], expected, rtol=1e-4, atol=1e-5)
    assert "expert_parallel_optimizer" in str(got["plain_error"])
    for replicas in (1, 2):
        restored = _restore(tmp_path / "trained.weights.h5", replicas, "match")
        _assert_same_state(restored, reference)
        np.testing.assert_allclose(
            restored.predict(batch, batch_size=GLOBAL_BATCH, verbose=0), got["outputs"], rtol=1e-5, atol=1e-6
        )


# What the surviving worker reports when its peer died: the coordination
# service's missed heartbeats, or the failed collective itself.
_PEER_LOST = ("unhealthy", "UnavailableError", "Collective ops is aborted", "DeadlineExceeded")


def _start_until_marked(commands, log_dir, marker, timeout=500, attempts=3):
    """Starts a cluster and waits for `marker`; restarts it when a port was taken."""
    for _ in range(attempts):
        run = cluster.Cluster(commands, log_dir)
        deadline = time.monotonic() + timeout
        while not os.path.exists(marker):
            if any(p.poll() is not None for p in run.processes) or time.monotonic() > deadline:
                run.stop()
                if run.port_was_taken():
                    break
                raise AssertionError(f"the cluster stopped before {marker}:\n{run.outputs_text()}")
            time.sleep(0.2)
        else:
            return run
    raise AssertionError(f"no free ports in {attempts} attempts:\n{run.outputs_text()}")


@pytest.mark.slow
def test_a_killed_worker_stops_the_run_which_resumes_from_its_backup(tmp_path):
    """SIGKILL worker 1 in epoch 2: worker 0 fails with a clear error, not a hang; a
    restarted cluster resumes from the backup and ends at the weights of an
    uninterrupted run."""
    reference, x, y = _prepare(tmp_path, "resume")
    commands = _commands("resume", 2, tmp_path)
    (tmp_path / "killed").mkdir()
    run = _start_until_marked(commands, tmp_path / "killed", tmp_path / "worker1-epoch1")
    try:
        time.sleep(1.0)  # into epoch 2 (worker 1 sleeps 0.5 s after each step)
        run.kill(1)
        # The chief must stop by itself: it gets the whole grace period.
        (code, output), _ = run.wait(timeout=300, grace=240)
    finally:
        run.stop()
    assert code not in (0, -9), f"worker 0 did not fail by itself ({code}):\n{output[-4000:]}"
    assert any(message in output for message in _PEER_LOST), output[-4000:]
    assert not (tmp_path / "results.npz").exists()

    (tmp_path / "resumed").mkdir()
    cluster.run_cluster(commands, tmp_path / "resumed", timeout=600)
    got = np.load(tmp_path / "results.npz")
    assert 1 <= int(got["initial_epoch"]) < EPOCHS  # resumed, not restarted or skipped
    reference.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    _assert_same_state(_restore(tmp_path / "trained.weights.h5", 1, "resume"), reference)
