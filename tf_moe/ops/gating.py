"""Gating maths of the routers (Shazeer et al. 2017, sections 2.1 and 4, appendix A; and later papers).

Small pure functions on float32 tensors, composed by the routers and tested
one by one against a numpy transcription of the papers' equations (the
Switch load-balancing loss of Fedus et al. 2022 and the router z-loss of
Zoph et al. 2022 besides the 2017 paper's gating). Masked
tokens are left out with `tf.where`, never by multiplying with the mask, so a
NaN or inf at a masked position cannot reach a result or a gradient.
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


def top_k_gates(logits, k, keep=None):
    """`Softmax(KeepTopK(logits, k))` in sparse form.

    Args:
        logits: [tokens, num_experts] float32 gate logits `H(x)`.
        k: number of experts kept per token.
        keep: how many of the largest logits to return (default `k`); the
            smooth load needs `k + 1` of them, so one top-k serves both.

    Returns:
        `(expert_index, expert_weight, top_logits)`: the indices [tokens, k]
        (int32, best first), the softmax over the kept logits [tokens, k],
        and the `keep` largest logits, sorted.
    """
    top_logits, top_index = tf.math.top_k(logits, k=keep or k, sorted=True)
    return top_index[..., :k], tf.nn.softmax(top_logits[..., :k], axis=-1), top_logits


def smooth_load(clean_logits, noisy_logits, stddev, k, valid=None, top_values=None):
    """The differentiable load estimator of section 4 and appendix A.

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
        valid: optional [..., tokens] bool; tokens that are False count
            zero, whatever their logits hold.
        top_values: optional [..., tokens, k + 1], the k + 1 largest noisy
            logits, sorted, where the caller has them already (from
            `top_k_gates(..., keep=k + 1)`).

    Returns:
        [..., num_experts] float32 expected number of tokens per expert.
    """
    if top_values is None:
        top_values, _ = tf.math.top_k(noisy_logits, k=k + 1, sorted=True)
    threshold_if_in = top_values[..., k : k + 1]
    threshold_if_out = top_values[..., k - 1 : k]
    # The threshold is picked before the (elementwise) CDF, so it runs once.
    threshold = tf.where(noisy_logits > threshold_if_in, threshold_if_in, threshold_if_out)
    normal = tf.constant(2.0**0.5, tf.float32)
    prob = 0.5 * tf.math.erfc(-(clean_logits - threshold) / (stddev * normal))
    if valid is not None:
        prob = tf.where(valid[..., None], prob, 0.0)
    return tf.reduce_sum(prob, axis=-2)


def importance(expert_index, expert_weight, num_experts):
    """`Importance(X) = sum_x G(x)` from the sparse gates, in O(tokens*k).

    Args:
        expert_index: int32 expert ids of any shape (e.g. [tokens, k] or
            flat assignments); ids >= num_experts are ignored (masked or
            unrouted), and so are their weights, even non-finite ones.
        expert_weight: float gate values, the shape of `expert_index`.
        num_experts: number of experts.

    Returns:
        [num_experts] float32.
    """
    ids = tf.reshape(expert_index, [-1])
    weight = tf.reshape(tf.cast(expert_weight, tf.float32), [-1])
    weight = tf.where(ids < num_experts, weight, 0.0)
    return tf.math.unsorted_segment_sum(weight, ids, num_experts + 1)[:num_experts]


def hard_load(expert_index, num_experts):
    """Number of tokens sent to each expert; ids >= num_experts are ignored."""
    ids = tf.reshape(expert_index, [-1])
    return tf.math.unsorted_segment_sum(
        tf.ones_like(ids, tf.float32), ids, num_experts + 1
    )[:num_experts]


def load_balancing_loss(counts, probability_sums, num_tokens, k=1):
    """`E * sum_i f_i P_i`, the load-balancing loss of Switch (Fedus et al. 2022, section 2.2).

    `f_i = counts_i / (k T)` is the fraction of the T tokens' k choices
    that went to expert i (not differentiable), `P_i = probability_sums_i
    / T` the mean router probability of expert i (differentiable). With
    f counting all k choices and divided by k, both sum to 1 and the loss
    is 1 under perfect balance whatever k (the routers multiply it by their
    weight alpha). Leading axes are kept (e.g. one loss per sequence).

    Args:
        counts: [..., E] choices per expert (a count, without gradient).
        probability_sums: [..., E] router probabilities summed over tokens.
        num_tokens: [...] T; 0 gives a loss of 0.
        k: choices per token.

    Returns:
        [...] float32.
    """
    num_experts = counts.shape[-1]
    tokens = tf.maximum(tf.cast(num_tokens, tf.float32), 1.0)[..., None]
    fraction = tf.stop_gradient(tf.cast(counts, tf.float32)) / (k * tokens)
    probability = tf.cast(probability_sums, tf.float32) / tokens
    return num_experts * tf.reduce_sum(fraction * probability, axis=-1)


def router_z_loss(logits, valid=None):
    """The router z-loss of ST-MoE (Zoph et al. 2022, section 3.1).

    `(1/T) sum_t (log sum_j exp(h_t,j))^2`, the mean over tokens of the
    squared log-partition of the router logits: it keeps the logits small,
    which keeps the softmax stable in low precision.

    Args:
        logits: [..., tokens, n] float32 router logits; all leading axes are
            tokens too (e.g. [groups, capacity, n] buffer slots).
        valid: optional bool of the shape of `logits` without its last axis;
            rows that are False count zero, whatever their logits hold.

    Returns:
        A float32 scalar, 0 when no row is valid.
    """
    if valid is not None:
        # Zeroed before the maths, so that not even a gradient sees them.
        logits = tf.where(valid[..., None], logits, 0.0)
        valid = tf.reshape(valid, [-1])
    squared = tf.reshape(tf.square(tf.reduce_logsumexp(logits, axis=-1)), [-1])
    return _masked_mean(squared, valid, empty=0.0)


def topk_agreement(noisy_index, clean_logits, valid=None):
    """Mean share of each token's noisy top-k set that the noise-free one shares.

    `|TopK(H(x)) & TopK(x W_g)| / k`, averaged over the valid tokens: how
    often the routing seen while training with noise (section 2.1) is the
    one used at inference. 1.0 when nothing was compared (no valid token).

    Args:
        noisy_index: [tokens, k] int32 experts picked from the noisy logits.
        clean_logits: [tokens, n] float32 noise-free logits `x W_g`.
        valid: optional [tokens] bool.

    Returns:
        A float32 scalar in [0, 1].
    """
    k = noisy_index.shape[-1]
    _, clean_index = tf.math.top_k(clean_logits, k=k)
    # Indices within a set are distinct, so matching pairs count the overlap.
    shared = tf.reduce_sum(
        tf.cast(tf.equal(noisy_index[:, :, None], clean_index[:, None, :]), tf.float32),
        axis=[1, 2],
    )
    return _masked_mean(shared / k, valid, empty=1.0)


def noise_to_signal(stddev, clean_logits, valid=None):
    """Scale of the gating noise relative to the spread of the clean logits.

    The mean over valid tokens of the noise stddev `Softplus(x W_noise) +
    epsilon` (averaged over experts), divided by the mean over valid tokens
    of the population standard deviation across experts of `x W_g`. Around 1
    or above, the noise rather than the input decides the routing.

    Clean logits without any spread (all zero, as with the zero-initialised
    `W_g` of section 2.1 before its first update) give `inf` when there is
    noise: the noise alone decides. No valid token, or no noise, gives 0.

    Args:
        stddev: [tokens, n] float32 noise scale.
        clean_logits: [tokens, n] float32 `x W_g`.
        valid: optional [tokens] bool.

    Returns:
        A float32 scalar >= 0, or inf.
    """
    noise = _masked_mean(tf.reduce_mean(stddev, axis=-1), valid, empty=0.0)
    signal = _masked_mean(tf.math.reduce_std(clean_logits, axis=-1), valid, empty=0.0)
    has_signal = signal > 0.0
    ratio = noise / tf.where(has_signal, signal, 1.0)
    return tf.where(has_signal, ratio, tf.where(noise > 0.0, float("inf"), 0.0))


def _masked_mean(values, valid, empty):
    """Mean of [tokens] `values` over the valid tokens; `empty` if there is none."""
    if valid is None:
        valid = tf.ones_like(values, tf.bool)
    count = tf.reduce_sum(tf.cast(valid, tf.float32))
    total = tf.reduce_sum(tf.where(valid, values, 0.0))
    return tf.where(count > 0, total / tf.maximum(count, 1.0), empty)
