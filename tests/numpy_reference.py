"""Independent numpy transcription of the papers' equations.

Shazeer et al. 2017: noisy top-k gating (section 2.1), importance and the
smooth load (section 4, appendix A), and the routing diagnostics of the
noisy top-k router. Then the later routers, each from its own paper: Switch
and top-k routing with the f . P loss (Fedus et al. 2022), the router
z-loss (Zoph et al. 2022), expert choice (Zhou et al. 2022), loss-free
balancing (Wang et al. 2024; DeepSeek-V3) and hash routing (Roller et al.
2021). Written from the formulas, element by element, with none of the
tricks the TensorFlow code uses (kth_excluding is computed by deleting
component i; top-k sets by sorting each row).
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


# Routers beyond the 2017 paper, each from its own paper's equations.


def softmax_rows(logits):
    """Row-wise softmax, one row at a time."""
    out = np.zeros_like(logits, dtype=np.float64)
    for t in range(logits.shape[0]):
        e = np.exp(logits[t] - logits[t].max())
        out[t] = e / e.sum()
    return out


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def top_k_routing(x, w_gate, k, normalize=False):
    """Softmax over all experts, then the top k (Fedus et al. 2022, section 2.2; Mixtral).

    Returns (probabilities [T, E], dense gates [T, E], choices [T, k]).
    """
    p = softmax_rows(x @ w_gate)
    gates = np.zeros_like(p)
    choices = np.zeros((p.shape[0], k), int)
    for t in range(p.shape[0]):
        top = np.argsort(-p[t], kind="stable")[:k]
        choices[t] = top
        values = p[t, top]
        gates[t, top] = values / values.sum() if normalize else values
    return p, gates, choices


def switch_balance_loss(probabilities, choices, alpha):
    """`alpha * E * sum_i f_i P_i`, f over all k choices divided by k (eq. 4-6)."""
    t_count, n = probabilities.shape
    k = choices.shape[1]
    loss = 0.0
    for i in range(n):
        f_i = sum(1 for t in range(t_count) for j in range(k) if choices[t, j] == i) / (k * t_count)
        p_i = sum(probabilities[t, i] for t in range(t_count)) / t_count
        loss += f_i * p_i
    return alpha * n * loss


def z_loss(logits):
    """Router z-loss of ST-MoE (Zoph et al. 2022, section 3.1): mean of logsumexp^2."""
    total = 0.0
    for row in logits:
        total += math.log(sum(math.exp(v) for v in row)) ** 2
    return total / len(logits)


def expert_choice(x, w_gate, capacity_factor):
    """Zhou et al. 2022, section 3: each expert takes its top C = ceil(T c / E) tokens.

    Returns (scores S [T, E], dense gates [T, E], C).
    """
    scores = softmax_rows(x @ w_gate)
    t_count, n = scores.shape
    capacity = min(math.ceil(t_count * capacity_factor / n), t_count)
    gates = np.zeros_like(scores)
    for i in range(n):
        for t in np.argsort(-scores[:, i], kind="stable")[:capacity]:
            gates[t, i] = scores[t, i]
    return scores, gates, capacity


def loss_free_routing(x, w_gate, bias, k, affinity="sigmoid"):
    """DeepSeek-V3 section 2.1.2: top-k of s + b, gates s normalised over the chosen.

    Returns (affinities s [T, E], dense gates [T, E], choices [T, k]).
    """
    logits = x @ w_gate
    s = sigmoid(logits) if affinity == "sigmoid" else softmax_rows(logits)
    gates = np.zeros_like(s)
    choices = np.zeros((s.shape[0], k), int)
    for t in range(s.shape[0]):
        top = np.argsort(-(s[t] + bias), kind="stable")[:k]
        choices[t] = top
        gates[t, top] = s[t, top] / s[t, top].sum()
    return s, gates, choices


def loss_free_bias_update(bias, choices, n, rate):
    """Wang et al. 2024, Algorithm 1: b_i += rate * sign(mean_j c_j - c_i)."""
    counts = np.array([np.sum(choices == i) for i in range(n)], float)
    return np.array([b + rate * np.sign(counts.mean() - c) for b, c in zip(bias, counts)])


def sequence_balance_loss(s, choices, sequence_ids, alpha):
    """DeepSeek-V3 eq. 17-20, each sequence on its own, averaged over sequences."""
    n, k = s.shape[1], choices.shape[1]
    losses = []
    for seq in sorted(set(sequence_ids)):
        rows = [t for t in range(len(sequence_ids)) if sequence_ids[t] == seq]
        t_count = len(rows)
        loss = 0.0
        for i in range(n):
            f_i = n / (k * t_count) * sum(1 for t in rows if i in choices[t])
            p_i = sum(s[t, i] / s[t].sum() for t in rows) / t_count
            loss += f_i * p_i
        losses.append(alpha * loss)
    return float(np.mean(losses))


def hash_expert(token_id, num_experts, seed=0):
    """The hash router's map, in Python integers: a 32-bit mixing function of (id, seed)."""
    mask = 2**32 - 1
    h = (token_id % 2**32) ^ ((seed * 0x9E3779B1 + 0x7F4A7C15) & mask)
    h = (((h >> 16) ^ h) * 0x45D9F3B) & mask
    h = (((h >> 16) ^ h) * 0x45D9F3B) & mask
    h = (h >> 16) ^ h
    return h % num_experts
