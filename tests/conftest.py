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

# Hypothesis profiles of the property-based tests (tests/properties): the
# default run is bounded and derandomized (stable in CI, a few minutes in
# all); the slow-marked twins run the large profile (4x the examples, about
# 3600 cases in 10-15 minutes on 2 cores), whose size TF_MOE_PROPERTY_EXAMPLES overrides.
# `--hypothesis-profile tf_moe_slow` runs the default tests at that size too.
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.internal.conjecture import providers as _hypothesis_providers  # noqa: E402

# Hypothesis (from 6.131) also draws constants it finds in the source of
# the local modules imported so far (tf_moe's), so a derandomized test
# drew other examples depending on what else the session had imported.
# Pinned to none, with the version range of setup.cfg's test extra: the
# examples depend on the strategies alone
# (tests/properties/test_reproducible.py).
_hypothesis_providers._get_local_constants = lambda: _hypothesis_providers._local_constants

_PROFILE = dict(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("tf_moe", max_examples=25, **_PROFILE)
settings.register_profile(
    "tf_moe_slow", max_examples=int(os.environ.get("TF_MOE_PROPERTY_EXAMPLES", "100")), **_PROFILE
)
settings.load_profile("tf_moe")
