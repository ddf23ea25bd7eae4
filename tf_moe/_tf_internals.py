"""The private TensorFlow functions tf_moe relies on, in one place.

tests/test_tf_internals.py pins their behaviour, so an upgrade that changes
them fails there first.
"""

import tensorflow as tf
from tensorflow.python.ops import control_flow_util


def in_xla_compilation():
    """Whether the ops being built now will be compiled by XLA.

    True inside `tf.function(jit_compile=True)` (and Keras `jit_compile`),
    also in functions and control flow nested in it; False in eager mode and
    in functions left to TensorFlow's executor. XLA needs every shape known
    at compile time, so data-dependent shapes must be avoided there.
    """
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
