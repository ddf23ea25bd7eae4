"""Forward+backward step time of MoE dispatch against a dense FFN baseline.

The backward pass computes the gradients of every weight and of the input,
as for a layer with layers below it.

Each configuration runs in a fresh subprocess so its peak memory (host RSS
on CPU, the allocator's peak on GPU) is its own. Every time is reported as a
ratio to the dense FFN of the same active FLOPs (hidden width k*h), timed
alternately with it in the same process, and to the configuration's
roofline: max(FLOPs / GEMM rate, bytes / memory bandwidth), with both rates
measured by probes in the same process (the best of several runs of a
2048^3 matmul in the compute dtype, and of an in-place add of two 256 MiB
float32 arrays). FLOPs are those of the gate's two matmuls and the k
experts per token, forward and backward (3x forward); the bytes are the
float32 weights read by the forward pass and again by the backward pass and
their gradients written (12 bytes per parameter): no step can cost less.
Each child applies `tf_moe.performance.configure_allocator()` first, as the
`tf-moe` command does, unless --default-allocator.

Dispatchers compared:
  moe            tf_moe.MoELayer, dropless (sort-based dispatch, dynamic capacity)
  moe_cf1.25     tf_moe.MoELayer with capacity_factor=1.25 (static shapes)
  experts_only   the stacked experts alone on a perfectly balanced buffer of
                 k*tokens/n rows each: the floor any dispatcher feeding this
                 batched matmul can reach, so moe / experts_only is the cost
                 of gating and dispatch
  partition      per-expert loop: tf.dynamic_partition / dynamic_stitch
  onehot_einsum  one-hot [tokens, experts, capacity] dispatch and combine
                 einsums (GShard-style), capacity factor 1.25
  every_expert   every expert on every token, weighted by the sparse gates

Usage:
  python benchmarks/dispatch.py                     # the BENCHMARKS.md table
  python benchmarks/dispatch.py --experts 4 16 --tokens 1024   # quicker
  python benchmarks/dispatch.py --jit-compile --methods moe_cf1.25 experts_only
  python benchmarks/dispatch.py --policy mixed_bfloat16 --methods moe experts_only
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("dense", "moe", "moe_cf1.25", "experts_only", "partition", "onehot_einsum", "every_expert")


def dense_ffn(d, hidden):
    """The dense FFN an MoE layer is matched against, built: `hidden` ReLU units, then back to `d`."""
    import keras

    layer = keras.Sequential([keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(d)])
    layer.build((None, d))
    return layer


def _build(method, n, k, d, h, tokens, jit_compile=False):
    """Returns (step_fn, variables) for one method; step_fn(x) -> grads."""
    import keras
    import tensorflow as tf

    import tf_moe

    if method == "dense":
        layer = dense_ffn(d, k * h)
        forward = lambda x: layer(x)  # noqa: E731
    elif method in ("moe", "moe_cf1.25"):
        layer = tf_moe.MoELayer(n, k, h, capacity_factor=1.25 if method == "moe_cf1.25" else None)
        layer.build((None, d))
        forward = lambda x: tf.cast(layer(x, training=True), tf.float32) + 0.0 * tf.add_n(layer.losses)  # noqa: E731
    elif method == "experts_only":
        if (k * tokens) % n:
            raise ValueError(f"experts_only needs k * tokens divisible by n, got {k * tokens} and {n}")
        layer = tf_moe.FeedForwardExperts(n, h, d)
        layer.build((n, None, d))
        forward = lambda x: layer(tf.reshape(tf.tile(x, [k, 1]), [n, k * tokens // n, d]))  # noqa: E731
    else:
        if keras.mixed_precision.global_policy().name != "float32":
            raise ValueError(f"{method} is written for float32 only")
        # The comparison dispatchers share tf_moe's router and stacked experts,
        # so only the dispatch differs.
        gate = tf_moe.NoisyTopKRouter(n, k)
        gate.build((None, d))
        experts = tf_moe.FeedForwardExperts(n, h, d)
        experts.build((n, None, d))
        layer = keras.Sequential([gate, experts])  # only to collect variables
        w1, b1, w2, b2 = experts.kernel_in, experts.bias_in, experts.kernel_out, experts.bias_out

        def expert(e, x):
            return tf.nn.relu(x @ w1[e] + b1[e]) @ w2[e] + b2[e]

        def forward(x):
            r = gate(x, training=True)
            # Assignments come choice-major: [k * T] -> [T, k].
            idx, wgt = (tf.transpose(tf.reshape(t, [k, tokens])) for t in (r.expert_id, r.weight))
            if method == "partition":
                flat_e = tf.reshape(idx, [-1])
                flat_t = tf.repeat(tf.range(tokens), k)
                flat_w = tf.reshape(wgt, [-1, 1])
                parts = tf.dynamic_partition(tf.range(tokens * k), flat_e, n)
                outs = [expert(e, tf.gather(x, tf.gather(flat_t, parts[e]))) for e in range(n)]
                y = tf.dynamic_stitch(parts, outs) * flat_w
                return tf.math.unsorted_segment_sum(y, flat_t, tokens)
            if method == "onehot_einsum":
                capacity = int(-(-1.25 * k * tokens // n))
                mask = tf.one_hot(idx, n)  # [T, k, n]
                pos = tf.cumsum(tf.reshape(tf.transpose(mask, [1, 0, 2]), [-1, n]), axis=0) - 1
                pos = tf.transpose(tf.reshape(pos, [k, tokens, n]), [1, 0, 2])
                keep = mask * tf.cast(pos < capacity, tf.float32)
                slot = tf.one_hot(tf.cast(tf.reduce_sum(pos * keep, -1), tf.int32), capacity)
                dispatch = tf.einsum("tkn,tkc->tnc", keep, slot)  # [T, n, C]
                combine = tf.einsum("tkn,tkc,tk->tnc", keep, slot, wgt)
                buf = tf.einsum("tnc,td->ncd", dispatch, x)
                hid = tf.nn.relu(tf.einsum("ncd,ndh->nch", buf, w1) + b1)
                out = tf.einsum("nch,nhd->ncd", hid, w2) + b2
                return tf.einsum("tnc,ncd->td", combine, out)
            # every_expert
            dense_gates = tf.reduce_sum(tf.one_hot(idx, n) * wgt[..., None], axis=1)  # [T, n]
            hid = tf.nn.relu(tf.einsum("td,ndh->nth", x, w1) + b1)
            out = tf.einsum("nth,nhd->ntd", hid, w2) + b2
            return tf.einsum("tn,ntd->td", dense_gates, out)
    variables = layer.trainable_variables

    @tf.function(jit_compile=jit_compile)
    def step(x):
        # The input's gradient too, as for a layer with layers below it.
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(tf.square(tf.cast(forward(x), tf.float32)))
        return tape.gradient(loss, [x] + variables)

    return step


def _time(step, x, fetch=False):
    """Seconds and minor page faults of one step.

    The step returns when its gradients are computed (eager execution is
    synchronous); `fetch` also copies each to NumPy, which maps fresh
    memory for every copy.
    """
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    grads = step(x)
    if fetch:
        [g.numpy() for g in grads if g is not None]
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def machine_probes(dtype, size=2048, mib=256):
    """`probe(repeats) -> (FLOP/s, bytes/s)`: the best of `repeats` runs of each probe.

    FLOP/s: a size^3 matmul in `dtype`. Bytes/s: `v += w` on two float32
    arrays of `mib` MiB (reads two, writes one).
    """
    import tensorflow as tf

    a = tf.cast(tf.random.normal([size, size]), dtype)
    matmul = tf.function(lambda a: [tf.matmul(a, a)])
    length = mib * 2**18
    v = tf.Variable(tf.zeros([length]))
    w = tf.ones([length])

    @tf.function
    def add(w):
        v.assign_add(w, read_value=False)
        return []

    matmul(a)
    add(w)

    def probe(repeats):
        gemm = min(_time(matmul, a)[0] for _ in range(repeats))
        copy = min(_time(add, w)[0] for _ in range(repeats))
        return 2 * size**3 / gemm, 3 * length * 4 / copy

    return probe


def roofline(n, k, d, h, tokens, gemm, bandwidth):
    """`(seconds, bound)`: the least time of one MoE step and what bounds it.

    FLOPs: forward and backward (3x the forward's 2 per multiply-add) of
    the gate's x W_g and x W_noise and of each token's k experts. Bytes:
    every float32 weight read forward, read again backward and its gradient
    written.
    """
    flops = 3 * 2 * (tokens * d * 2 * n + k * tokens * (d * h + h * d))
    params = n * (d * h + h + h * d + d) + 2 * d * n
    compute, memory = flops / gemm, 12 * params / bandwidth
    return (compute, "FLOPs") if compute >= memory else (memory, "bytes")


def _measure(method, n, k, d, h, tokens, repeats, jit_compile=False, fetch=False):
    """Times `method` and the dense FFN alternately in one process.

    Alternating the two keeps their ratio honest on a shared machine whose
    load changes during the run. Peak memory is read after the method's
    warm-up, before the dense baseline is built.
    """
    import keras
    import tensorflow as tf

    x = tf.random.normal([tokens, d], seed=0)
    step = _build(method, n, k, d, h, tokens, jit_compile)
    for _ in range(2):  # trace and warm up
        _time(step, x, fetch)
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    dense = _build("dense", n, k, d, h, tokens, jit_compile)
    for _ in range(2):
        _time(dense, x, fetch)
    probe = machine_probes(keras.mixed_precision.global_policy().compute_dtype)
    times, dense_times, faults, bounds, probes = [], [], [], [], []
    for _ in range(repeats):
        seconds, step_faults = _time(step, x, fetch)
        times.append(seconds)
        faults.append(step_faults)
        dense_times.append(_time(dense, x, fetch)[0])
        # The probes run beside the steps, so the bound sees the same load.
        probes.append(probe(repeats=2))
        bounds.append(roofline(n, k, d, h, tokens, *probes[-1]))
    gemm, bandwidth = (statistics.median(p) for p in zip(*probes))
    return {
        "seconds": statistics.median(times),
        "dense_seconds": statistics.median(dense_times),
        "ratio": statistics.median(t / b for t, b in zip(times, dense_times)),
        "roofline_seconds": statistics.median(b for b, _ in bounds),
        "bound_by": "/".join(sorted({by for _, by in bounds})),
        "roofline_ratio": statistics.median(t / b for t, (b, _) in zip(times, bounds)),
        "faults": statistics.median(faults),
        "gemm_gflops": gemm / 1e9,
        "bandwidth_gbs": bandwidth / 1e9,
        "peak_mib": peak,
        "device": "GPU" if gpus else "CPU",
    }


def _run_child(args, method, n):
    cmd = [sys.executable, __file__, "--child", method, str(n), "--k", str(args.k), "--d", str(args.d),
           "--h", str(args.h), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
           "--policy", args.policy]
    for flag in ("jit_compile", "default_allocator", "fetch_gradients"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if out.returncode < 0:
        return {"error": f"killed by signal {-out.returncode} (out of memory?)"}
    if out.returncode != 0:
        lines = [line for line in out.stderr.splitlines() if "Error" in line] or ["failed"]
        return {"error": lines[-1].strip()}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--methods", nargs="+", default=list(METHODS[1:]), choices=METHODS[1:])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--every-expert-max", type=int, default=16,
                        help="skip every_expert above this expert count (its cost grows as n/k)")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile every step, the dense baseline's too, with XLA")
    parser.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16", "mixed_float16"],
                        help="Keras dtype policy of every layer, the dense baseline's too")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave TensorFlow's CPU allocator as the build chose it (no configure_allocator)")
    parser.add_argument("--fetch-gradients", action="store_true",
                        help="copy every gradient to NumPy after each step (this benchmark's first version did)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        method, n = args.child[0], int(args.child[1])
        import tf_moe

        if not args.default_allocator:
            tf_moe.performance.configure_allocator()
        import keras

        keras.mixed_precision.set_global_policy(args.policy)
        result = _measure(method, n, args.k, args.d, args.h, args.tokens, args.repeats, args.jit_compile,
                          args.fetch_gradients)
        print(json.dumps(result))
        return

    print(f"# tokens={args.tokens} d={args.d} h={args.h} k={args.k} policy={args.policy} "
          f"jit_compile={args.jit_compile} allocator={'default' if args.default_allocator else 'configured'}"
          f"{' fetch_gradients' if args.fetch_gradients else ''}; ratios = medians over {args.repeats} "
          f"alternating runs of method / dense FFN of hidden {args.k * args.h}, and of method / roofline")
    print("| experts | method | ms/step | dense ms/step | ratio to dense | roofline ms (bound) | ratio to roofline "
          "| faults/step | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    probes = []
    for n in args.experts:
        for method in args.methods:
            if method == "every_expert" and n > args.every_expert_max:
                print(f"| {n} | {method} | skipped (n/k = {n // args.k}x dense FLOPs) | | | | | | |")
                continue
            r = _run_child(args, method, n)
            if "error" in r:
                print(f"| {n} | {method} | error: {r['error'][:80]} | | | | | | |")
                continue
            probes.append(r)
            print(f"| {n} | {method} | {r['seconds'] * 1e3:.1f} | {r['dense_seconds'] * 1e3:.1f} "
                  f"| {r['ratio']:.2f} | {r['roofline_seconds'] * 1e3:.1f} ({r['bound_by']}) "
                  f"| {r['roofline_ratio']:.2f} | {r['faults']:.0f} | {r['peak_mib']:.0f} |", flush=True)
    if probes:
        gemm = [r["gemm_gflops"] for r in probes]
        bandwidth = [r["bandwidth_gbs"] for r in probes]
        print(f"# device: {probes[-1]['device']}; GEMM rate {min(gemm):.0f}-{max(gemm):.0f} GFLOP/s, memory "
              f"bandwidth {min(bandwidth):.1f}-{max(bandwidth):.1f} GB/s (per run; the roofline uses each run's own)")


if __name__ == "__main__":
    main()
