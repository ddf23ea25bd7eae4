"""Independent numpy transcription of the paper's equations.

Shazeer et al. 2017: noisy top-k gating (section 2.1), importance and the
smooth load (section 4, appendix A), and the routing diagnostics of the
noisy top-k router. Written from the formulas, element by element, with
none of the tricks the TensorFlow code uses (kth_excluding is computed by
deleting component i).
"""

import math

import numpy as np


def softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def noisy_top_k(x, w_gate, w_noise, noise, k, noise_epsilon, train=True):
    """Returns (H, G dense [T, n], stddev)."""
    clean = x @ w_gate
    stddev = softplus(x @ w_noise) + noise_epsilon
    h = clean + noise * stddev if train else clean
    gates = np.zeros_like(h)
    for t in range(h.shape[0]):
        top = np.argsort(-h[t], kind="stable")[:k]
        e = np.exp(h[t, top] - h[t, top].max())
        gates[t, top] = e / e.sum()
    return h, gates, stddev


def kth_excluding(v, k, i):
    """k-th highest component of v leaving out v_i."""
    rest = np.delete(v, i)
    return np.sort(rest)[::-1][k - 1]


def smooth_load(x, w_gate, h, stddev, k):
    clean = x @ w_gate
    t_count, n = h.shape
    p = np.zeros((t_count, n))
    for t in range(t_count):
        for i in range(n):
            p[t, i] = normal_cdf((clean[t, i] - kth_excluding(h[t], k, i)) / stddev[t, i])
    return p.sum(axis=0)


def cv_squared(v):
    v = np.asarray(v, np.float64)
    return v.var() / (v.mean() ** 2 + 1e-10)


def relu(x):
    return np.maximum(x, 0)


def expert(x, w_in, b_in, w_out, b_out, activation=relu):
    """One feed-forward expert, `activation(x W1 + b1) W2 + b2` (biases may be None)."""
    hidden = x @ w_in + (0 if b_in is None else b_in)
    out = activation(hidden) @ w_out
    return out + (0 if b_out is None else b_out)


def expert_gradients(x, w_in, b_in, w_out, b_out, d_out, activation, activation_derivative):
    """Gradients of `sum(expert(x) * d_out)` for one expert, by the chain rule.

    `activation_derivative(pre)` is the activation's derivative at the
    pre-activation `pre = x W1 + b1`. Returns `(dx, dW1, dW2, db1, db2)`,
    the bias gradients None where the biases are.
    """
    pre = x @ w_in + (0 if b_in is None else b_in)
    hidden = activation(pre)
    d_hidden = d_out @ w_out.T
    d_pre = d_hidden * activation_derivative(pre)
    db1 = None if b_in is None else d_pre.sum(axis=0)
    db2 = None if b_out is None else d_out.sum(axis=0)
    return d_pre @ w_in.T, x.T @ d_pre, hidden.T @ d_out, db1, db2


def dense_moe(x, gates, w_in, b_in, w_out, b_out, activation=relu):
    """Every expert on every token, weighted by the (sparse) gates."""
    out = 0.0
    for e in range(w_in.shape[0]):
        b1 = None if b_in is None else b_in[e]
        b2 = None if b_out is None else b_out[e]
        out = out + gates[:, e : e + 1] * expert(x, w_in[e], b1, w_out[e], b2, activation)
    return out


def topk_agreement(h, clean, k, valid):
    """Mean over valid tokens of |top-k of h  &  top-k of clean| / k."""
    shares = []
    for t in np.flatnonzero(valid):
        noisy_set = set(np.argsort(-h[t], kind="stable")[:k])
        clean_set = set(np.argsort(-clean[t], kind="stable")[:k])
        shares.append(len(noisy_set & clean_set) / k)
    return float(np.mean(shares))


def noise_to_signal(stddev, clean, valid):
    """Mean noise stddev over mean per-token std of the clean logits (valid tokens)."""
    noise = np.mean([stddev[t].mean() for t in np.flatnonzero(valid)])
    signal = np.mean([clean[t].std() for t in np.flatnonzero(valid)])
    return float(noise / signal)
