"""What bounds the fused optimizer updates: memory traffic or their arithmetic.

`step.py` times the fused update of an expert bank against its floor, the
bytes it must move at the machine's memory bandwidth. This script times,
for Keras's SGD, momentum SGD and Adam:

* the update users run (`tf_moe.training.fused_optimizer`) of one float32
  variable as large as a bank (`--bank`, millions of weights), against
  that floor (bytes per weight / bandwidth, the bandwidth measured beside
  it by `dispatch.machine_probes`);
* the arithmetic of TensorFlow's fused kernel that the update calls
  (`ResourceApplyGradientDescent`, `ResourceApplyKerasMomentum`,
  `ResourceApplyAdam`) on one core, on 65,536 weights whose gradient and
  slots stay in the core's L2 cache: what each weight costs with memory
  traffic out of the way (a child process with one intra-op thread).

Nanoseconds per weight: the median round, min-max in brackets. Where the
kernel's arithmetic spread over the cores is a good part of the floor, an
update that does not overlap the two lands near their sum.

Usage:
  python benchmarks/update_kernels.py                     # the BENCHMARKS.md table
  python benchmarks/update_kernels.py --optimizers adam --rounds 3
"""

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, os.path.dirname(_HERE))

from step import OPTIMIZERS, UPDATE_BYTES, _keras_optimizer, _ratio, median_round  # noqa: E402


def _update(optimizer_name, weights):
    """A compiled function applying the fused update once to one variable of `weights` float32s."""
    import keras
    import tensorflow as tf

    from tf_moe.training import fused_optimizer

    variable = keras.Variable(tf.random.normal([weights], seed=0), name="bank")
    gradient = tf.random.normal([weights], stddev=1e-3, seed=1)
    optimizer = fused_optimizer(_keras_optimizer(optimizer_name))
    optimizer.build([variable])

    @tf.function
    def update():
        optimizer.apply([gradient], [variable])
        return []

    update()
    return update


def _seconds_per_weight(update, weights, repeats):
    start = time.perf_counter()
    update()
    return (time.perf_counter() - start) / (weights * repeats)


def measure(optimizers, weights, rounds, probe_repeats=3):
    """`{optimizer: [ns per weight per round]}` of the bank-sized update, and each round's bandwidth (bytes/s)."""
    from dispatch import machine_probes

    probe = machine_probes("float32")
    updates = {name: _update(name, weights) for name in optimizers}
    times = {name: [] for name in optimizers}
    bandwidth = []
    for _ in range(rounds):
        bandwidth.append(probe(probe_repeats)[1])
        for name, update in updates.items():
            times[name].append(1e9 * _seconds_per_weight(update, weights, 1))
    return times, bandwidth


# The kernel each fused update calls, on resource variables `w` (and its slots) and gradient `g`.
_KERNELS = {
    "sgd": lambda tf, w, m, v, g: tf.raw_ops.ResourceApplyGradientDescent(var=w.handle, alpha=1e-7, delta=g),
    "momentum": lambda tf, w, m, v, g: tf.raw_ops.ResourceApplyKerasMomentum(
        var=w.handle, accum=m.handle, lr=1e-7, grad=g, momentum=0.9),
    "adam": lambda tf, w, m, v, g: tf.raw_ops.ResourceApplyAdam(
        var=w.handle, m=m.handle, v=v.handle, beta1_power=0.9, beta2_power=0.999, lr=1e-7, beta1=0.9,
        beta2=0.999, epsilon=1e-7, grad=g),
}


def arithmetic(optimizers, rounds, weights=2**16, repeats=256):
    """`{optimizer: [ns per weight per round]}` of its kernel on one thread, its operands in L2 cache."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    w, m, v = (tf.Variable(tf.random.normal([weights], seed=i)) for i in range(3))
    v.assign(tf.abs(v))
    g = tf.random.normal([weights], stddev=1e-3, seed=3)
    times = {}
    for name in optimizers:

        @tf.function
        def kernel(name=name):
            for _ in range(repeats):
                _KERNELS[name](tf, w, m, v, g)
            return []

        kernel()
        times[name] = [1e9 * _seconds_per_weight(kernel, weights, repeats) for _ in range(rounds)]
    return times


def _arithmetic_in_child(optimizers, rounds):
    """`arithmetic` in a fresh process: the thread count is fixed when TensorFlow starts."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--arithmetic", "--rounds", str(rounds), "--optimizers", *optimizers],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--bank", type=float, default=64.0, help="millions of weights of the bank-sized update")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--arithmetic", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.arithmetic:
        import json

        print(json.dumps(arithmetic(args.optimizers, args.rounds)))
        return
    in_cache = _arithmetic_in_child(args.optimizers, args.rounds)
    weights = int(args.bank * 2**20)
    times, bandwidth = measure(args.optimizers, weights, args.rounds)
    cores = os.cpu_count()
    print(f"# bank {weights:,} weights; {args.rounds} rounds; memory bandwidth {min(bandwidth) / 1e9:.1f}-"
          f"{max(bandwidth) / 1e9:.1f} GB/s; {cores} cores\n")
    print("| update | bytes / weight | floor ns / weight | bank ns / weight | bank / floor | kernel arithmetic, "
          "one core, ns / weight | arithmetic on every core / floor |")
    print("|---|---|---|---|---|---|---|")
    for name in args.optimizers:
        floors = [1e9 * UPDATE_BYTES[name] / b for b in bandwidth]
        i, ratios = median_round(times[name], floors)
        one_core = sorted(in_cache[name])
        median = one_core[len(one_core) // 2]
        print(f"| {name} | {UPDATE_BYTES[name]} | {floors[i]:.3f} | {times[name][i]:.3f} | {_ratio(ratios, i)} | "
              f"{median:.3f} ({one_core[0]:.3f}-{one_core[-1]:.3f}) | {median / cores / floors[i]:.2f} |")


if __name__ == "__main__":
    main()
