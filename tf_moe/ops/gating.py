"""Gating maths of the sparsely-gated MoE (PAPER.md sections 1 and 3).

Small pure functions on float32 tensors, composed by the gate layers and
tested one by one against a numpy transcription of the paper's equations.
"""

import tensorflow as tf

# Keeps CV^2 finite when every entry is zero (an empty batch).
_CV_EPSILON = 1e-10
# Lower bound for the noise scale so the smooth load never divides by zero.
_MIN_NOISE_STDDEV = 1e-9


def cv_squared(x):
    """Squared coefficient of variation, `var(x) / mean(x)^2`.

    Uses the population variance; returns 0 for a vector of one entry or an
    all-zero vector, so the balancing losses are defined for any batch.

    Args:
        x: a 1-D float tensor, e.g. the importance or load per expert.

    Returns:
        A float32 scalar.
    """
    x = tf.cast(x, tf.float32)
    mean = tf.reduce_mean(x)
    variance = tf.reduce_mean(tf.square(x - mean))
    return variance / (tf.square(mean) + _CV_EPSILON)


def noise_stddev(noise_logits, noise_epsilon):
    """`Softplus((x W_noise)_i) + noise_epsilon`, bounded away from zero."""
    stddev = tf.nn.softplus(noise_logits) + noise_epsilon
    return tf.maximum(stddev, _MIN_NOISE_STDDEV)


def top_k_gates(logits, k):
    """`Softmax(KeepTopK(logits, k))` in sparse form.

    Args:
        logits: [tokens, num_experts] float32 gate logits `H(x)`.
        k: number of experts kept per token.

    Returns:
        `(expert_index, expert_weight, top_logits)`: the indices [tokens, k]
        (int32, best first), the softmax over the kept logits [tokens, k],
        and the kept logits themselves.
    """
    top_logits, expert_index = tf.math.top_k(logits, k=k, sorted=True)
    return expert_index, tf.nn.softmax(top_logits, axis=-1), top_logits


def smooth_load(clean_logits, noisy_logits, stddev, k, token_weight=None):
    """The differentiable load estimator of section 3 (appendix A).

    `P(x, i) = Phi((clean_i - kth_excluding(H(x), k, i)) / stddev_i)`, summed
    over tokens. The k-th highest of H(x) leaving out component i is the
    (k+1)-th highest overall when i is itself among the top k, and the k-th
    highest otherwise, so one top-(k+1) gives it for every i. Leading batch
    axes are kept: the hierarchical gate computes every group's load at once
    from [groups, tokens, experts] inputs.

    Args:
        clean_logits: [..., tokens, num_experts] `x W_g`.
        noisy_logits: [..., tokens, num_experts] `H(x)`.
        stddev: [..., tokens, num_experts] noise scale.
        k: experts per token; needs `k < num_experts`.
        token_weight: optional [..., tokens] float 0/1 weights (masked
            tokens 0).

    Returns:
        [..., num_experts] float32 expected number of tokens per expert.
    """
    top_values, _ = tf.math.top_k(noisy_logits, k=k + 1, sorted=True)
    threshold_if_in = top_values[..., k : k + 1]
    threshold_if_out = top_values[..., k - 1 : k]
    is_in = noisy_logits > threshold_if_in
    normal = tf.constant(2.0**0.5, tf.float32)
    prob_if_in = 0.5 * tf.math.erfc(-(clean_logits - threshold_if_in) / (stddev * normal))
    prob_if_out = 0.5 * tf.math.erfc(-(clean_logits - threshold_if_out) / (stddev * normal))
    prob = tf.where(is_in, prob_if_in, prob_if_out)
    if token_weight is not None:
        prob = prob * token_weight[..., None]
    return tf.reduce_sum(prob, axis=-2)


def importance(expert_index, expert_weight, num_experts):
    """`Importance(X) = sum_x G(x)` from the sparse gates, in O(tokens*k).

    Args:
        expert_index: [tokens, k] int32 expert ids; ids >= num_experts are
            ignored (used for masked tokens).
        expert_weight: [tokens, k] float gate values.
        num_experts: number of experts.

    Returns:
        [num_experts] float32.
    """
    return tf.math.unsorted_segment_sum(
        tf.reshape(tf.cast(expert_weight, tf.float32), [-1]),
        tf.reshape(expert_index, [-1]),
        num_experts + 1,
    )[:num_experts]


def hard_load(expert_index, num_experts):
    """Number of tokens sent to each expert; ids >= num_experts are ignored."""
    ids = tf.reshape(expert_index, [-1])
    return tf.math.unsorted_segment_sum(
        tf.ones_like(ids, tf.float32), ids, num_experts + 1
    )[:num_experts]
