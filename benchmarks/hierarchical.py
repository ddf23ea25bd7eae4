"""Hierarchical (64 groups x 64 experts) vs flat 4096-expert MoE step time.

Both layers have the same 4096 stacked experts, k = 4 experts per token
(flat k=4; hierarchical k_primary = k_secondary = 2, as in the paper's
MoE-4096-h) and the same tokens. They differ only in gating: the flat gate
computes x W_g, noise, top-k and the smooth load over all 4096 experts for
every token (O(T * 4096 * d)); the hierarchical gate over 64 groups, then
64 experts in each of the 2 chosen groups (O(T * (64 + 2 * 64) * d)).

Measured, in one process on the same machine, the median wall time of a
forward+backward step (training mode: noise, smooth loads, balancing loss):
  gate   the gate alone: loss = sum of gates + CV^2(importance) + CV^2(load)
  layer  the whole layer (gate + dispatch + experts + combine):
         loss = sum(y^2) + its balancing loss
Ratios are flat / hierarchical (> 1: the hierarchy is faster).

Usage:
  python benchmarks/hierarchical.py                 # the BENCHMARKS.md table
  python benchmarks/hierarchical.py --tokens 512 --steps 5   # quicker
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _step(layer, part):
    import tensorflow as tf

    from tf_moe.ops.gating import cv_squared

    def gate_loss(x):
        routing = layer.router(x, training=True)
        return tf.reduce_sum(routing.weight) + cv_squared(routing.importance) + cv_squared(routing.load)

    def layer_loss(x):
        y = layer(x, training=True)
        return tf.reduce_sum(tf.square(y)) + tf.add_n(layer.losses)

    loss_fn = gate_loss if part == "gate" else layer_loss
    variables = layer.router.trainable_weights if part == "gate" else layer.trainable_weights

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = loss_fn(x)
        return tape.gradient(loss, variables)

    return step


def _time(step, x, warmup, steps):
    for _ in range(warmup):
        step(x)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        grads = step(x)
        float(grads[0][(0,) * len(grads[0].shape)])  # wait for the result
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--experts-per-group", type=int, default=64)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--d", type=int, default=32, help="model width")
    parser.add_argument("--h", type=int, default=32, help="expert hidden width")
    parser.add_argument("--capacity-factor", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    import tf_moe

    a, b = args.groups, args.experts_per_group
    common = dict(hidden_units=args.h, capacity_factor=args.capacity_factor, seed=0)
    flat = tf_moe.MoE(a * b, 4, **common)
    hier = tf_moe.HierarchicalMoE(a, b, 2, 2, **common)
    rng = np.random.default_rng(0)
    for layer in (flat, hier):
        layer.build((None, args.d))
        # Non-zero gate weights, so routing is not the all-ties start.
        for variable in layer.router.trainable_weights:
            variable.assign(0.1 * rng.standard_normal(variable.shape).astype("float32"))

    print(f"# {a}x{b} hierarchical vs flat {a * b} experts, k=4, d={args.d}, h={args.h}, "
          f"capacity_factor={args.capacity_factor}, {os.cpu_count()} CPUs, "
          f"TF {tf.__version__}, median of {args.steps} steps")
    print("| tokens | part | flat (ms) | hierarchical (ms) | flat / hierarchical |")
    print("|---|---|---|---|---|")
    for tokens in args.tokens:
        x = tf.constant(rng.standard_normal((tokens, args.d)).astype("float32"))
        for part in ("gate", "layer"):
            flat_s = _time(_step(flat, part), x, args.warmup, args.steps)
            hier_s = _time(_step(hier, part), x, args.warmup, args.steps)
            print(f"| {tokens} | {part} | {1e3 * flat_s:.1f} | {1e3 * hier_s:.1f} | "
                  f"{flat_s / hier_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
