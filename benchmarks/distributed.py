"""Exchange traffic, step time and memory of data- and expert-parallel MoE training.

Trains a Dense layer followed by an MoE (so that gradients flow back
through both exchanges, as in a real network) on 1, 2 and 4 logical CPU
devices with the same global batch in three modes:

* `data`: `MoELayer` under MirroredStrategy, every replica holds all
  experts and their gradients are all-reduced;
* `all_gather`: `ExpertParallelMoE(exchange="all_gather")`, each replica
  holds num_experts / replicas experts and gathers every replica's
  dispatch buffer;
* `all_to_all`: `ExpertParallelMoE(exchange="all_to_all")`, the same
  shards, each buffer row sent once to its expert's replica.

For each it reports the bytes one replica sends per training step in the
token exchanges (counted from the static shapes of the tensors handed to
the collectives, forward and backward, with
`tf_moe.distribute.exchange.TrafficRecorder`), the bytes of the expert
gradients' all-reduce (data parallelism only; a ring all-reduce sends
2 (R-1)/R of them), the expert weights and Adam slots each device holds,
the time of one exchange of the layer's buffer alone (forward), the step
time, and the peak resident memory of the process (the Dense
layer's and router's gradient all-reduce is the same in every mode and not
counted). Every configuration runs in its own process. With one device the
two exchanges are the same layer (`ExpertParallelMoE` is then `MoELayer`):
it runs once. Every configuration runs `--rounds` times, in turn, and the
fastest times count: load from other work drifts over minutes.

Logical CPU devices share the machine's physical cores: step times measure
the overhead of the collectives and the exchange, not a speed-up.

    python benchmarks/distributed.py [--steps 10] [--repeats 3] [--rounds 2] [--devices 1 2 4]

`--scaling` prints instead, by formula, the per-device parameters, Adam
state and traffic per step of the paper's language-model experts for 1,024
to 131,072 experts over 16 to 512 devices (docs/distributed.md), and the
same formulas' predictions for this benchmark's measured configurations.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("data", "all_gather", "all_to_all")
FLOAT_BYTES = 4


def expert_parameters(units, hidden, output_units):
    """Parameters of one feed-forward expert with biases: d h + h + h o + o."""
    return units * hidden + hidden + hidden * output_units + output_units


def exchange_bytes(method, experts, devices, tokens, k, capacity_factor, units, output_units):
    """Bytes one device sends per training step in the token exchanges.

    Each device's buffer has `experts * C` rows, C = ceil(c k b / n) for its
    b tokens; a step exchanges it twice forward (d-wide tokens out, o-wide
    outputs back) and twice backward (their gradients). The all-to-all
    keeps the device's own 1/D of each buffer; the all-gather exchange
    sends the whole buffer to each of the D - 1 others.
    """
    capacity = math.ceil(capacity_factor * k * tokens / experts)
    buffer = 2 * experts * capacity * (units + output_units) * FLOAT_BYTES
    if method == "all_to_all":
        return buffer * (devices - 1) // devices
    return buffer * (devices - 1)


def per_device(experts, devices, units, hidden, output_units):
    """(expert parameters, router parameters) on one device under expert parallelism.

    The router (noisy top-k: W_g and W_noise, d x n each) is replicated.
    """
    return experts // devices * expert_parameters(units, hidden, output_units), 2 * units * experts


def _size(num_bytes):
    return f"{num_bytes / 1e9:,.1f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:,.0f} MB"


def _run_child(mode, devices, shape):
    """One configuration in its own process: its JSON result and peak RSS (MiB)."""
    names = ("steps", "repeats", "batch", "seq", "units", "hidden", "experts")
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, str(devices)]
    command += [f"--{k}={v}" for k, v in zip(names, shape)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        # wait4 gives this child's own peak resident set (KiB on Linux).
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0)
        err.seek(0)
        if status != 0:
            raise RuntimeError(f"{mode} on {devices} devices failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    return dict(result, peak_mib=usage.ru_maxrss / 1024)


def print_scaling(args):
    """The scaling table of docs/distributed.md and the checks against this benchmark."""
    d, h, o, k, c, b = 512, 1024, 512, 4, 1.25, 8192
    print(
        f"Experts of the paper's LM (d={d}, h={h}, o={o}: {expert_parameters(d, h, o):,} parameters), "
        f"k={k}, capacity factor {c}, b={b} tokens per device, float32, Adam (2 slots per parameter)."
    )
    print()
    print(
        "| experts n | devices D | experts / device | parameters / device | Adam state / device | "
        "all-to-all / step | all-gather exchange / step | data-parallel expert all-reduce / step | "
        "tokens per expert k b D / n |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (1024, 4096, 16384, 65536, 131072):
        for devices in (16, 64, 512):
            experts, router = per_device(n, devices, d, h, o)
            weights = (experts + router) * FLOAT_BYTES
            a2a = exchange_bytes("all_to_all", n, devices, b, k, c, d, o)
            gather = exchange_bytes("all_gather", n, devices, b, k, c, d, o)
            allreduce = 2 * (devices - 1) * n * expert_parameters(d, h, o) * FLOAT_BYTES // devices
            print(
                f"| {n:,} | {devices} | {n // devices:,} | {(experts + router) / 1e6:,.0f} M "
                f"({_size(weights)}) | {_size(2 * weights)} | {_size(a2a)} | {_size(gather)} | "
                f"{_size(allreduce)} | {k * b * devices / n:,.0f} |"
            )
    print()
    print(f"This benchmark's configurations (d={args.units}, h={args.hidden}, n={args.experts}, k=2, c=1.25):")
    tokens = args.batch * args.seq
    bank = args.experts * expert_parameters(args.units, args.hidden, args.units) * FLOAT_BYTES
    for devices in args.devices:
        if devices == 1:
            continue
        b = tokens // devices
        print(
            f"  {devices} devices: all-to-all "
            f"{exchange_bytes('all_to_all', args.experts, devices, b, 2, 1.25, args.units, args.units) / 1024:.0f} KiB, "
            f"all-gather exchange "
            f"{exchange_bytes('all_gather', args.experts, devices, b, 2, 1.25, args.units, args.units) / 1024:.0f} KiB, "
            f"data-parallel expert all-reduce {2 * (devices - 1) * bank / devices / 1024:.0f} KiB per step and device; "
            f"expert weights + Adam {3 * bank / devices / 2**20:.1f} MiB per device (data parallel: "
            f"{3 * bank / 2**20:.1f} MiB)"
        )


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
    from tf_moe.distribute.exchange import TrafficRecorder

    strategy = get_strategy("mirrored", devices=[d.name for d in tf.config.list_logical_devices("CPU")])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((seq, units))
        if mode == "data":
            layer = tf_moe.MoELayer(experts, 2, hidden, capacity_factor=1.25, name="moe")
        else:
            layer = ExpertParallelMoE(experts, 2, hidden, capacity_factor=1.25, exchange=mode, name="moe")
        model = keras.Model(inputs, layer(keras.layers.Dense(units)(inputs)))
        optimizer = keras.optimizers.Adam(1e-3)
        if mode != "data":
            optimizer = expert_parallel_optimizer(optimizer)
        model.compile(optimizer, "mse")
    x = np.random.default_rng(0).standard_normal((batch * steps, seq, units)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, x)).batch(batch, drop_remainder=True).repeat()
    traffic = TrafficRecorder()
    if mode != "data":
        layer.traffic = traffic
    model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
        times.append((time.perf_counter() - start) / steps)

    exchange_s = None
    if mode != "data" and devices > 1:
        exchange_s = time_exchange(strategy, mode, layer.experts, batch * seq // devices, units)

    def device_bytes(variable):
        """Bytes of the variable on one device: a shard, or a full copy."""
        value = variable.value if isinstance(variable, keras.Variable) else variable
        first = strategy.experimental_local_results(value)[0]
        return first.shape.num_elements() * first.dtype.size

    bank = sum(device_bytes(v) for v in layer.experts.weights)
    slots = sum(device_bytes(v) for v in model.optimizer.variables if "experts" in v.path)
    replicas = strategy.num_replicas_in_sync
    sent = [t.bytes_sent for t in traffic if t.replica in (0, None)]
    print(
        json.dumps(
            {
                # The fastest repeat: the least disturbed by other work on the machine.
                "step_s": min(times),
                "exchange_s": exchange_s,
                "exchange_bytes": sum(sent),
                "exchanges": len(sent),
                "allreduce_bytes": 2 * (replicas - 1) * bank // replicas if mode == "data" else 0,
                "bank_bytes": bank,
                "slot_bytes": slots,
            }
        )
    )


def time_exchange(strategy, method, experts, tokens, units, calls=20, repeats=5):
    """Seconds of one forward exchange of the layer's dispatch buffer, alone."""
    import tensorflow as tf

    from tf_moe.distribute.exchange import exchange
    from tf_moe.ops.dispatch import static_capacity

    replicas = strategy.num_replicas_in_sync
    capacity = static_capacity(1.25, 2 * tokens, experts.num_experts * replicas)
    shape = [replicas, experts.num_experts, capacity, units]
    buffers = strategy.experimental_distribute_values_from_function(lambda _: tf.random.normal(shape))
    step = tf.function(lambda x: strategy.run(lambda t: exchange(t, method), args=(x,)))
    step(buffers)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = step(buffers)
        strategy.experimental_local_results(out)[0].numpy()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest counts")
    parser.add_argument(
        "--rounds", type=int, default=2,
        help="runs of every configuration in turn; the fastest counts (spreads the load of a shared machine)",
    )
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=64, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--scaling", action="store_true", help="print the scaling analysis by formula")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DEVICES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.steps, args.repeats, args.batch, args.seq, args.units, args.hidden, args.experts)
    if args.child:
        run_one(args.child[0], int(args.child[1]), *shape)
        return
    if args.scaling:
        print_scaling(args)
        return

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(
        f"MoE: {args.experts} experts, k=2, d={args.units}, hidden={args.hidden}, capacity 1.25, Adam; "
        f"global batch {args.batch}x{args.seq} tokens; fastest of {args.repeats} x {args.steps} steps"
    )
    configurations = [
        (mode, devices) for mode in MODES for devices in args.devices
        # With one device both exchanges are the same layer without one.
        if not (devices == 1 and mode == "all_to_all")
    ]
    results = {}
    for _ in range(args.rounds):
        for mode, devices in configurations:
            result = _run_child(mode, devices, shape)
            best = results.setdefault((mode, devices), result)
            for key in ("step_s", "exchange_s"):
                if result[key] is not None and result[key] < best[key]:
                    best[key] = result[key]
    rows = []
    for (mode, devices), result in results.items():
        label = "expert (1 device)" if devices == 1 and mode != "data" else mode
        rows.append(dict(result, mode=label, devices=devices))
    print(f"fastest of {args.rounds} rounds")
    print()
    print(
        "| mode | devices | exchanges/step | exchange KiB/step/replica | expert all-reduce KiB/step/replica | "
        "expert weights + Adam per device (MiB) | one exchange alone (ms) | step (ms) | step / 1 device | "
        "peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        family = "data" if row["mode"] == "data" else "expert"
        base = next(r for r in rows if r["devices"] == args.devices[0] and (r["mode"] == "data") == (family == "data"))
        print(
            f"| {row['mode']} | {row['devices']} | {row['exchanges']} | {row['exchange_bytes'] / 1024:.0f} | "
            f"{row['allreduce_bytes'] / 1024:.0f} | {(row['bank_bytes'] + row['slot_bytes']) / 2**20:.1f} | "
            f"{'-' if row['exchange_s'] is None else format(row['exchange_s'] * 1e3, '.2f')} | "
            f"{row['step_s'] * 1e3:.1f} | {row['step_s'] / base['step_s']:.2f} | {row['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
