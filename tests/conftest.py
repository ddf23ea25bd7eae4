"""Test configuration shared by the whole suite.

The CPU is split into four logical devices before TensorFlow starts, so the
distribution tests can run MirroredStrategy and expert parallelism on 1, 2
or 4 devices of this machine. Single-device tests run on the first one.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
)
