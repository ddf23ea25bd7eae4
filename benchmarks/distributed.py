"""Step time and peak memory of data- and expert-parallel MoE training.

Trains one MoE block on 1, 2 and 4 logical CPU devices with the same global
batch, as plain data parallelism (`MoE`, every replica holds all experts)
and as the paper's data + expert parallelism (`ExpertParallelMoE`, each
replica holds num_experts / replicas experts). Every configuration runs in
its own process, so its peak resident memory is its own. Prints ratios
against the 1-device run of the same mode measured in this run.

Logical CPU devices share the machine's physical cores: this measures the
overhead of the collectives and the exchange, not a speed-up.

    python benchmarks/distributed.py [--steps 10] [--repeats 3] [--devices 1 2 4]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(mode, devices, steps, repeats, batch, seq, units, hidden, experts):
    """Child process: times `repeats` x `steps` training steps, prints JSON."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    sys.path.insert(0, ROOT)
    import tf_moe
    from tf_moe.distribute import ExpertParallelMoE, expert_parallel_optimizer, get_strategy

    strategy = get_strategy("mirrored", devices=[d.name for d in tf.config.list_logical_devices("CPU")])
    layer_cls = ExpertParallelMoE if mode == "expert" else tf_moe.MoELayer
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((seq, units))
        outputs = layer_cls(experts, 2, hidden, capacity_factor=1.25, name="moe")(inputs)
        model = keras.Model(inputs, outputs)
        optimizer = keras.optimizers.Adam(1e-3)
        if mode == "expert":
            optimizer = expert_parallel_optimizer(optimizer)
        model.compile(optimizer, "mse")
    x = np.random.default_rng(0).standard_normal((batch * steps, seq, units)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, x)).batch(batch, drop_remainder=True).repeat()
    model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
        times.append((time.perf_counter() - start) / steps)
    # The fastest repeat: the least disturbed by other work on the machine.
    print(json.dumps({"step_s": min(times)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest counts")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=64, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DEVICES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.steps, args.repeats, args.batch, args.seq, args.units, args.hidden, args.experts)
    if args.child:
        run_one(args.child[0], int(args.child[1]), *shape)
        return

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(
        f"MoE: {args.experts} experts, k=2, d={args.units}, hidden={args.hidden}, capacity 1.25; "
        f"global batch {args.batch}x{args.seq} tokens; fastest of {args.repeats} x {args.steps} steps"
    )
    rows = []
    for mode in ("data", "expert"):
        for devices in args.devices:
            command = [sys.executable, os.path.abspath(__file__), "--child", mode, str(devices)]
            command += [f"--{k}={v}" for k, v in zip(("steps", "repeats", "batch", "seq", "units", "hidden", "experts"), shape)]
            with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
                process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
                # wait4 gives this child's own peak resident set (KiB on Linux).
                _, status, usage = os.wait4(process.pid, 0)
                out.seek(0)
                err.seek(0)
                if status != 0:
                    raise RuntimeError(f"{mode} on {devices} devices failed:\n{err.read()[-3000:]}")
                result = json.loads(out.read().strip().splitlines()[-1])
            rows.append((mode, devices, result["step_s"], usage.ru_maxrss / 1024))
    print()
    print("| parallelism | devices | step (ms) | step / 1 device | peak RSS (MiB) | peak / 1 device |")
    print("|---|---|---|---|---|---|")
    for mode, devices, step_s, peak in rows:
        base = next(r for r in rows if r[0] == mode and r[1] == args.devices[0])
        print(
            f"| {mode} | {devices} | {step_s * 1e3:.1f} | {step_s / base[2]:.2f} | "
            f"{peak:.0f} | {peak / base[3]:.2f} |"
        )


if __name__ == "__main__":
    main()
