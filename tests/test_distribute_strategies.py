"""Strategies by name, and real two-process MultiWorkerMirroredStrategy."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tf_moe.distribute import get_strategy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_and_mirrored():
    assert get_strategy("default") is tf.distribute.get_strategy()
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    mirrored = get_strategy("mirrored", devices=devices)
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == 2


def test_auto_without_accelerators_or_cluster(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("TPU_NAME", raising=False)
    assert get_strategy("auto").num_replicas_in_sync == 1


def test_unknown_name():
    with pytest.raises(ValueError, match="`name` must be one of"):
        get_strategy("horovod")


def test_tpu_unreachable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(RuntimeError, match="No TPU is reachable"):
        get_strategy("tpu")


def test_strategies_of_different_sizes_coexist():
    """Two mirrored strategies over 2 then 4 devices in one process both run."""
    for count in (2, 4):
        strategy = get_strategy("mirrored", devices=[d.name for d in tf.config.list_logical_devices("CPU")[:count]])
        total = strategy.reduce(
            "SUM", strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("SUM", tf.constant(1.0))), axis=None
        )
        assert float(total) == count * count


_WORKER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import keras, numpy as np, tensorflow as tf
    import tf_moe
    from tf_moe.distribute import get_strategy
    from tests.test_distribute_strategies import build_model, data
    strategy = get_strategy("multiworker")
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    with strategy.scope():
        model = build_model()
    history = model.fit(data(), epochs=2, verbose=0).history
    np.savez(sys.argv[2], loss=history["loss"], aux=history["moe_aux_loss"], *model.get_weights())
    """
)


def build_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    outputs = tf_moe.MoE(4, 2, 8, noisy_gating=False, capacity_factor=2.0, name="moe")(inputs)
    model = keras.Model(inputs, outputs)
    model.get_layer("moe").gate.w_gate.assign(np.random.default_rng(0).standard_normal((6, 4)).astype("float32"))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def data():
    x = np.random.default_rng(1).standard_normal((32, 6)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, np.tanh(x))).batch(16)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# What a worker prints when another process took its port in the meantime.
_PORT_TAKEN = ("Address already in use", "Could not start gRPC server", "Failed to add port")


def _run_workers(script, tmp_path, timeout=240):
    """Runs the two workers; returns their outputs and exit codes.

    When one fails the other is stopped: it would wait for its peer.
    """
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes, logs = [], [tmp_path / f"worker{index}.log" for index in range(2)]
    try:
        for index in range(2):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
            with open(logs[index], "w") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, str(script), ROOT, str(tmp_path / f"worker{index}.npz")],
                    env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                ))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in processes) and not any(p.poll() for p in processes):
            assert time.monotonic() < deadline, "the workers did not finish in time"
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)
    return [(log.read_text(), process.returncode) for log, process in zip(logs, processes)]


def test_multiworker_two_processes_match_one_device(tmp_path):
    """Two worker processes on 127.0.0.1 = one device on the global batch."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    # The ports are free when chosen but may be taken before the workers
    # bind them: then try other ones.
    for _ in range(3):
        results = _run_workers(script, tmp_path)
        if not any(code and any(taken in output for taken in _PORT_TAKEN) for output, code in results):
            break
    for output, code in results:
        assert code == 0, output[-6000:]
    reference = build_model()
    history = reference.fit(data(), epochs=2, verbose=0).history
    for index in range(2):
        result = np.load(tmp_path / f"worker{index}.npz")
        np.testing.assert_allclose(result["aux"], history["moe_aux_loss"], rtol=1e-4)
        weights = [result[f"arr_{i}"] for i in range(len(reference.weights))]
        for got, expected in zip(weights, reference.get_weights()):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
