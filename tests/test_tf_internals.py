"""Pins the private TensorFlow behaviour that tf_moe/_tf_internals.py relies on."""

import tensorflow as tf

from tf_moe._tf_internals import in_xla_compilation


def test_in_xla_compilation_is_true_only_under_jit_compile():
    seen = {}

    def probe(name):
        def fn(x):
            seen[name] = in_xla_compilation()
            # Nested control flow and functions inherit the context.
            def record(key):
                seen[key] = in_xla_compilation()
                return x

            tf.cond(x > 0, lambda: record(name + "/cond"), lambda: x)
            tf.function(lambda: record(name + "/inner"))()
            return x

        return fn

    x = tf.constant(1.0)
    probe("eager")(x)
    tf.function(probe("graph"))(x)
    tf.function(probe("xla"), jit_compile=True)(x)
    assert seen == {
        "eager": False, "eager/cond": False, "eager/inner": False,
        "graph": False, "graph/cond": False, "graph/inner": False,
        "xla": True, "xla/cond": True, "xla/inner": True,
    }
