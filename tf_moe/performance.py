"""Process settings that make training steps cheaper on CPU hosts.

`configure_allocator` makes TensorFlow keep the CPU memory a step frees in
its own pool (a best-fit-with-coalescing allocator, as on GPUs) and hand it
out again on the next step. Without a pool every large tensor is a fresh
mapping from the kernel, zeroed and page-faulted in 4 KiB at a time, then
unmapped when freed: an MoE with many experts has large weight gradients
(1 GiB per step for 256 experts of 512 x 1024 and 1024 x 512), so that costs
about as much as the arithmetic that fills them.

TensorFlow's x86-64 Linux wheels with oneDNN on (their default) already use
such a pool for CPU tensors; the setting matters where oneDNN is off
(`TF_ENABLE_ONEDNN_OPTS=0`) or absent from the build. It does not touch
NumPy: copying a large tensor out (`tensor.numpy()`, `get_weights()`) every
step still maps fresh memory each time. BENCHMARKS.md ("Allocation") has
the measurements, and why glibc's malloc settings are not used instead.
"""

import os

# TensorFlow reads it once, when it creates its CPU device (the first
# operation), not when it is imported.
_POOL_VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"


def configure_allocator():
    """Makes TensorFlow reuse freed CPU memory from its own pool, step after step.

    Sets the environment variable `TF_CPU_ALLOCATOR_USE_BFC=1` unless it is
    already set (a value the user chose is kept). The `tf-moe` command and
    the benchmarks apply it at start-up.

    Limits: TensorFlow reads the variable when it creates its CPU device, at
    its first operation (building a Keras layer's weights counts), so call
    it right after `import tf_moe`, before anything runs; later it changes
    nothing until the process restarts. Setting the variable in the
    environment of a new process does the same. Memory in the pool stays
    with the process: its resident size stays near the peak of a step
    instead of falling between steps (the pool grows as needed, up to
    `TF_CPU_BFC_MEM_LIMIT_IN_MB`, 64 GiB by default).

    Returns:
        The value of `TF_CPU_ALLOCATOR_USE_BFC` now in the environment.

    Example:

    >>> import tf_moe
    >>> tf_moe.performance.configure_allocator()
    '1'
    """
    return os.environ.setdefault(_POOL_VARIABLE, "1")
