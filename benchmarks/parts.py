"""Forward+backward time of each part of an MoE layer's step, alone.

Where `benchmarks/dispatch.py` times the whole layer against a dense FFN,
this times its parts one by one on the same sizes (4096 tokens, d = 512,
expert hidden h = 1024, k = 2), each in a `tf.function` with the gradients
the layer's step needs:

  gate      the router (`--router`, default the paper's noisy top-k) in
            training mode, with the gradients of its weights and of the
            tokens through the gates, its own losses and, for routers that
            use them, CV^2(importance) + CV^2(load)
  dispatch  sort-based dispatch of the router's assignments into the
            dropless buffers `MoELayer` runs (`split_dispatch`: c0 slots
            for every expert, c1 more for the m fullest), and the tokens'
            (dense) gradient
  combine   the weighted sum of the assignments' expert outputs back into
            tokens, and the gradients of the outputs and the gate values
  split     the stacked experts on those buffers (`call_split`), weights'
            and buffers' gradients: the layer's experts
  experts   the same on one buffer padded to the largest expert (the
            layer's experts before the split)
  balanced  the same on k * tokens / n rows per expert, what they would
            cost without padding (`dispatch.py`'s experts_only floor)
  dense     the dense FFN of equal multiply-adds (hidden k * h) on the
            tokens, its weights' and the tokens' gradients: the layer the
            parts together replace

With the noisy router the routing is its zero-initialised gate's (pure
noise, as at the start of training); with `--router top_k`, MoELayer's
default, or `top_k_gate`, its gate's start: either way the counts are
nearly equal, and the split buffers pad only the fullest experts. Each time is the
median of `--repeats` calls, made in rounds that call every part once.
Run it on two checkouts to compare them:

  python benchmarks/parts.py --experts 16 256
  python benchmarks/parts.py --experts 16 --d 128 --h 256 --tokens 1024 --router top_k
  python benchmarks/parts.py --experts 256 --router top_k --overflow-cost 8
  PYTHONPATH=/path/to/other/checkout python benchmarks/parts.py --experts 16 256
"""

import argparse
import os
import statistics
import sys
import time

if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_ms(fns, repeats):
    """{name: median ms} of `repeats` calls of each function, interleaved.

    Each round calls every function once, so a load that comes and goes
    weighs on all of them alike, not on whichever ran at the time.
    """
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def parts(n, k, d, h, tokens, repeats, router_name="noisy_top_k", overflow_cost=None):
    """{part: median ms} of one forward+backward of each part."""
    import keras
    import tensorflow as tf

    import tf_moe
    from dispatch import dense_ffn  # benchmarks/dispatch.py, after tf_moe: it puts this checkout on sys.path
    from tf_moe.ops import dispatch
    from tf_moe.ops.gating import cv_squared

    keras.utils.set_random_seed(0)
    router = tf_moe.routers.get(router_name, n, k)
    router.build((None, d))
    experts = tf_moe.FeedForwardExperts(n, h, d)
    experts.build((n, None, d))
    if overflow_cost is not None:
        experts.overflow_cost = overflow_cost
    x = tf.random.normal([tokens, d], seed=1)
    routing = router(x, training=True)
    token_id, expert_id, weight = routing.token_id, routing.expert_id, routing.weight
    buffer = dispatch.dispatch(x, token_id, expert_id, n)[0]
    split = dispatch.split_dispatch(x, token_id, expert_id, n, experts.overflow_cost)
    split_buffers = (split.buffer, split.overflow)
    outputs = tf.concat([tf.reshape(y, [-1, d]) for y in experts.call_split(*split_buffers, split.overflow_experts)], 0)
    balanced = buffer[:, : -(-k * tokens // n)]  # the largest expert holds at least the mean

    @tf.function
    def gate(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            r = router(x, training=True)
            loss = tf.add_n([tf.reduce_sum(r.weight), *r.losses.values()])
            if router.uses_balancing_loss:
                loss += cv_squared(r.importance) + cv_squared(r.load)
        return tape.gradient(loss, [x] + router.trainable_variables)

    @tf.function
    def dispatch_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            s = dispatch.split_dispatch(x, token_id, expert_id, n, experts.overflow_cost)
            loss = tf.reduce_sum(s.buffer * s.buffer) + tf.reduce_sum(s.overflow * s.overflow)
        # Dense, as a layer below needs it (autodiff's gather gradient is sparse).
        return tf.convert_to_tensor(tape.gradient(loss, x))

    @tf.function
    def combine_step(outputs, weight):
        with tf.GradientTape() as tape:
            tape.watch([outputs, weight])
            y = dispatch.combine(outputs, split.slot, split.kept, token_id, weight, tokens)
            loss = tf.reduce_sum(y * x)
        return tape.gradient(loss, [outputs, weight])

    @tf.function
    def split_step(inputs, overflow_inputs):
        with tf.GradientTape() as tape:
            tape.watch([inputs, overflow_inputs])
            y, overflow_y = experts.call_split(inputs, overflow_inputs, split.overflow_experts)
            loss = tf.reduce_sum(y) + tf.reduce_sum(overflow_y)
        return tape.gradient(loss, [inputs, overflow_inputs] + experts.trainable_variables)

    def layer_step(layer):
        @tf.function
        def step(inputs):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                loss = tf.reduce_sum(layer(inputs))
            return tape.gradient(loss, [inputs] + layer.trainable_variables)

        return step

    experts_step, dense_step = layer_step(experts), layer_step(dense_ffn(d, k * h))

    return {
        **_median_ms(
            {
                "gate": lambda: gate(x),
                "dispatch": lambda: dispatch_step(x),
                "combine": lambda: combine_step(outputs, weight),
                "split": lambda: split_step(*split_buffers),
                "experts": lambda: experts_step(buffer),
                "balanced": lambda: experts_step(balanced),
                "dense": lambda: dense_step(x),
            },
            repeats,
        ),
        "capacity": int(buffer.shape[1]),
        "split_shape": (int(split.buffer.shape[1]), int(split.overflow.shape[1]), int(split.overflow.shape[0])),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--router", default="noisy_top_k", help="a router name of tf_moe.routers (not hash)")
    parser.add_argument(
        "--overflow-cost", type=float, default=None,
        help="rows one expert on the second split buffer counts as (default: FeedForwardExperts.overflow_cost)",
    )
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf_moe

    if args.router not in tf_moe.routers.NAMES or args.router == "hash":
        parser.error(f"--router: one of {[name for name in tf_moe.routers.NAMES if name != 'hash']}")

    tf_moe.performance.configure_allocator()
    overflow_cost = tf_moe.FeedForwardExperts.overflow_cost if args.overflow_cost is None else args.overflow_cost
    print(f"# tf_moe from {os.path.dirname(tf_moe.__file__)}; tokens={args.tokens} d={args.d} h={args.h} "
          f"k={args.k} router={args.router} overflow_cost={overflow_cost}; "
          f"median of {args.repeats} forward+backward calls, ms")
    print("| experts | gate | dispatch | combine | experts, split (c0 + c1 x m) "
          "| experts at capacity (capacity / mean) | experts at the mean | dense FFN (hidden k*h) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.experts:
        r = parts(n, args.k, args.d, args.h, args.tokens, args.repeats, args.router, args.overflow_cost)
        mean = args.k * args.tokens / n
        first, further, overflowing = r["split_shape"]
        print(f"| {n} | {r['gate']:.1f} | {r['dispatch']:.1f} | {r['combine']:.1f} "
              f"| {r['split']:.1f} ({first} + {further} x {overflowing}) "
              f"| {r['experts']:.1f} ({r['capacity']} / {mean:.0f}) | {r['balanced']:.1f} | {r['dense']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
