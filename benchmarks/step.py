"""The whole training step of an MoE layer, optimizer update included, against a dense FFN.

`benchmarks/dispatch.py` times forward and backward; a user's step also
applies the gradients, and an MoE has `num_experts / k` times the dense
layer's weights to update. Here one compiled step (`tf.function`) is the
forward pass of `tf_moe.MoELayer` (its default router, dropless, training mode:
balancing losses, metrics), the gradients of every weight and of the input
(as for a layer with layers below it) and the optimizer's update of every
weight, against the same step of a dense FFN of the same active FLOPs
(hidden `k*h`) with the same optimizer. Each optimizer runs twice: Keras's
own (`keras.optimizers.SGD` / `Adam`) and its fused twin
(`tf_moe.training.fused_optimizer`, one `ResourceApply*` kernel per
variable).

Every (experts, optimizer) pair runs in its own process; inside it the four
steps (MoE and dense, Keras's and fused update) and the update of the
expert bank alone run one after the other in each round, then again in
the reverse order (each time is the mean of the two), so the ratios hold
on a loaded machine: each ratio is taken within a round. A row
reports the round with the median ratio (its ms columns are that round's,
so they agree with the ratio) and, in brackets, the least and largest
ratio over the rounds.

Roofline (the least time, with the GEMM rate and memory bandwidth measured
beside the steps by `dispatch.machine_probes`): forward and backward at
max(FLOPs / GEMM rate, 12 bytes per weight / bandwidth), as in
`dispatch.py`, then the update, which needs the finished gradients, at its
bytes / bandwidth: SGD reads the gradient and the weight and writes the
weight (12 bytes per float32 weight), momentum SGD also reads and writes
its velocity (20), Adam reads the gradient, both moments and the weight and
writes the moments and the weight (28). "Update alone" times the update of
the stacked expert kernels and biases by themselves (gradients given)
against that floor.

Usage:
  python benchmarks/step.py                              # the BENCHMARKS.md tables
  python benchmarks/step.py --experts 16 --optimizers sgd --rounds 3
  python benchmarks/step.py --router top_k
"""

import argparse
import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, os.path.dirname(_HERE))

OPTIMIZERS = ("sgd", "momentum", "adam")
# Bytes the update moves per float32 weight: gradient and weight read, weight
# written (SGD); and each slot read and written.
UPDATE_BYTES = {"sgd": 12, "momentum": 20, "adam": 28}


def _keras_optimizer(name):
    import keras

    # Tiny steps: the weights must stay where they are for the timing.
    return {
        "sgd": lambda: keras.optimizers.SGD(1e-6),
        "momentum": lambda: keras.optimizers.SGD(1e-6, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(1e-7),
    }[name]()


def _layers(n, k, d, h, router):
    import keras

    import tf_moe
    from dispatch import dense_ffn

    moe = tf_moe.MoELayer(n, k, h, **({"router": router} if router else {}))
    moe.build((None, d))
    if hasattr(moe.router, "w_gate"):
        # A trained gate's spread, not a gate at its start (small for the
        # default, near zero for top_k_gate; at zero, sending every token to
        # the same k experts, for the paper's), which a learning rate of
        # 1e-7 would keep for the whole benchmark.
        gate = moe.router.w_gate
        gate.assign(keras.random.normal(gate.shape, stddev=d**-0.5, seed=0))
    return moe, dense_ffn(d, k * h)


def _train_step(layer, optimizer, is_moe):
    """A compiled step: forward, the gradients of the weights and the input, the update."""
    import tensorflow as tf

    variables = layer.trainable_variables
    optimizer.build(variables)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True) if is_moe else layer(x)
            loss = tf.reduce_mean(tf.square(y))
            if is_moe:
                loss += tf.add_n(layer.losses)
        grads = tape.gradient(loss, [x] + variables)
        optimizer.apply(grads[1:], variables)
        return grads[0]

    return step


def _update_alone(experts, optimizer):
    """The update of the expert bank's variables by themselves, from given gradients."""
    import tensorflow as tf

    variables = experts.trainable_variables
    grads = [tf.random.normal(v.shape, stddev=1e-3, seed=i) for i, v in enumerate(variables)]

    @tf.function
    def update(grads):
        optimizer.apply(grads, variables)
        return []

    return lambda: update(grads)


def _seconds(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def step_flops(n, k, d, h, tokens, moe):
    """Forward+backward FLOPs (3x the forward's): the gate's x [W_g, W_noise] and k experts per token."""
    experts = 2 * k * tokens * (d * h + h * d)
    return 3 * (experts + (2 * tokens * d * 2 * n if moe else 0))


def _measure(n, k, d, h, tokens, optimizer_name, rounds, router):
    import keras
    import tensorflow as tf

    from dispatch import machine_probes
    from tf_moe.training import fused_optimizer

    x = tf.random.normal([tokens, d], seed=0)
    moe, dense = _layers(n, k, d, h, router)
    steps, updates = {}, {}
    for kind in ("keras", "fused"):
        make = (lambda: _keras_optimizer(optimizer_name)) if kind == "keras" else (
            lambda: fused_optimizer(_keras_optimizer(optimizer_name)))
        moe_optimizer = make()
        steps[("moe", kind)] = _train_step(moe, moe_optimizer, True)
        steps[("dense", kind)] = _train_step(dense, make(), False)
        updates[kind] = _update_alone(moe.experts, moe_optimizer)
    for fn in list(steps.values()) + list(updates.values()):  # trace and warm up
        args = (x,) if fn in steps.values() else ()
        fn(*args)
        fn(*args)
    probe = machine_probes(keras.mixed_precision.global_policy().compute_dtype)
    sequence = [(key, fn, (x,)) for key, fn in steps.items()]
    sequence += [(("update", kind), fn, ()) for kind, fn in updates.items()]
    times = {key: [] for key, _, _ in sequence}
    probes = []
    for _ in range(rounds):
        # Each timed twice, in one order then the reverse, so a load that
        # rises or falls during the round weighs on all of them alike.
        spent = dict.fromkeys(times, 0.0)
        for key, fn, args in sequence + sequence[::-1]:
            spent[key] += _seconds(fn, *args)
        for key, seconds in spent.items():
            times[key].append(seconds / 2)
        probes.append(probe(repeats=2))
    bank = sum(int(v.shape.num_elements()) for v in moe.experts.trainable_variables)
    params = {
        "moe": sum(int(v.shape.num_elements()) for v in moe.trainable_variables),
        "dense": sum(int(v.shape.num_elements()) for v in dense.trainable_variables),
    }
    update_bytes = UPDATE_BYTES[optimizer_name]
    rooflines = {"moe": [], "dense": [], "update": []}
    for gemm, bandwidth in probes:
        for model in ("moe", "dense"):
            compute = max(step_flops(n, k, d, h, tokens, model == "moe") / gemm, 12 * params[model] / bandwidth)
            rooflines[model].append(compute + update_bytes * params[model] / bandwidth)
        rooflines["update"].append(update_bytes * bank / bandwidth)
    return {
        "times": {f"{a}/{b}": t for (a, b), t in times.items()},
        "rooflines": rooflines,
        "bank_params": bank,
        "gemm_gflops": [p[0] / 1e9 for p in probes],
        "bandwidth_gbs": [p[1] / 1e9 for p in probes],
    }


def _run_child(args, n, optimizer_name):
    cmd = [sys.executable, __file__, "--child", str(n), optimizer_name, "--k", str(args.k), "--d", str(args.d),
           "--h", str(args.h), "--tokens", str(args.tokens), "--rounds", str(args.rounds),
           *(["--router", args.router] if args.router else [])]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if out.returncode != 0:
        lines = [line for line in out.stderr.splitlines() if "Error" in line] or [f"exit status {out.returncode}"]
        return {"error": lines[-1].strip()}
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_round(numerators, denominators):
    """`(i, ratios)`: the round whose numerator / denominator is the median one, and every round's ratio.

    Every column of a row is read from that one round, so the ratio
    column agrees with the ms columns beside it.
    """
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2], ratios


def _ratio(ratios, i):
    """`median (min-max)` of a row's ratio."""
    return f"{ratios[i]:.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adam"], choices=OPTIMIZERS)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--router", help="MoELayer's router (a tf_moe.routers name; default: its default)")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--child", nargs=2, metavar=("N", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import tf_moe

        tf_moe.performance.configure_allocator()
        result = _measure(int(args.child[0]), args.k, args.d, args.h, args.tokens, args.child[1], args.rounds,
                          args.router)
        print(json.dumps(result))
        return

    import importlib.util

    load = os.getloadavg()
    print(f"# tf_moe from {os.path.dirname(importlib.util.find_spec('tf_moe').origin)}; tokens={args.tokens} d={args.d} h={args.h} "
          f"k={args.k} router={args.router or 'default'}, float32; {args.rounds} rounds; load average at start "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| experts | optimizer | update | MoE ms | dense ms | MoE / dense (min-max) | MoE roofline ms "
          "| MoE / roofline (min-max) |")
    print("|---|---|---|---|---|---|---|---|")
    alone, gemm, bandwidth = [], [], []
    for n in args.experts:
        for name in args.optimizers:
            r = _run_child(args, n, name)
            if "error" in r:
                print(f"| {n} | {name} | error: {r['error'][:100]} | | | | | |", flush=True)
                continue
            t, roof = r["times"], r["rooflines"]
            gemm += r["gemm_gflops"]
            bandwidth += r["bandwidth_gbs"]
            for kind in ("keras", "fused"):
                moe, dense = t[f"moe/{kind}"], t[f"dense/{kind}"]
                i, ratios = median_round(moe, dense)
                roof_ratios = [a / b for a, b in zip(moe, roof["moe"])]
                print(f"| {n} | {name} | {kind} | {1e3 * moe[i]:.1f} | {1e3 * dense[i]:.1f} | {_ratio(ratios, i)} "
                      f"| {1e3 * roof['moe'][i]:.1f} | {_ratio(roof_ratios, i)} |", flush=True)
            alone.append((n, name, r))
    print()
    print("Update of the expert bank alone (its kernels and biases; gradients given):")
    print()
    print("| experts | optimizer | bank params (M) | bytes / param | update | ms | floor ms (bytes / bandwidth) "
          "| / floor (min-max) |")
    print("|---|---|---|---|---|---|---|---|")
    for n, name, r in alone:
        floor = r["rooflines"]["update"]
        for kind in ("keras", "fused"):
            times = r["times"][f"update/{kind}"]
            i, ratios = median_round(times, floor)
            print(f"| {n} | {name} | {r['bank_params'] / 1e6:.1f} | {UPDATE_BYTES[name]} | {kind} "
                  f"| {1e3 * times[i]:.1f} | {1e3 * floor[i]:.1f} | {_ratio(ratios, i)} |")
    load = os.getloadavg()
    if gemm:
        print(f"\n# GEMM rate {min(gemm):.0f}-{max(gemm):.0f} GFLOP/s, memory bandwidth "
              f"{min(bandwidth):.1f}-{max(bandwidth):.1f} GB/s (per round; each roofline uses its round's); "
              f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
