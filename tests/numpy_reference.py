"""Independent numpy transcription of the paper's equations (PAPER.md 1, 3).

Written from the formulas, element by element, with none of the tricks the
TensorFlow code uses (kth_excluding is computed by deleting component i).
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


def dense_moe(x, gates, w_in, b_in, w_out, b_out):
    """Every expert on every token, weighted by the (sparse) gates."""
    out = 0.0
    for e in range(w_in.shape[0]):
        hidden = np.maximum(x @ w_in[e] + b_in[e], 0)
        out = out + gates[:, e : e + 1] * (hidden @ w_out[e] + b_out[e])
    return out
