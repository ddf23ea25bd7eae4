"""Independent numpy transcription of the papers' equations.

Shazeer et al. 2017: noisy top-k gating (section 2.1), importance and the
smooth load (section 4, appendix A), the routing diagnostics of the noisy
top-k router, the hierarchical gates (appendix B), batchwise and threshold
gating (appendix F), dense MoE outputs and capacity drops. Then the later
routers, each from its own paper: Switch and top-k routing with the f . P
loss (Fedus et al. 2022), the router z-loss (Zoph et al. 2022), expert
choice (Zhou et al. 2022), loss-free balancing (Wang et al. 2024;
DeepSeek-V3) and hash routing (Roller et al. 2021). Written from the
formulas, element by element, with none of the tricks the TensorFlow code
uses (kth_excluding is computed by deleting component i; top-k sets by
sorting each row).
"""

import math
from fractions import Fraction

import numpy as np


def softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2.0)))


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


def numeric_gradient(f, params, eps=1e-6):
    """Central finite differences of the scalar `f(*params)` in every element of every array.

    The references are float64, so `eps=1e-6` leaves an error near 1e-10
    relative, far below float32's; at points where the routing is not
    within `eps` of changing (generic random inputs), it is the gradient.
    """
    params = [np.array(p, np.float64) for p in params]
    gradients = []
    for p in params:
        gradient = np.zeros_like(p)
        for index in np.ndindex(p.shape):
            saved = p[index]
            p[index] = saved + eps
            up = f(*params)
            p[index] = saved - eps
            down = f(*params)
            p[index] = saved
            gradient[index] = (up - down) / (2 * eps)
        gradients.append(gradient)
    return gradients


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


def dense_moe_magnitude(x, gates, w_in, b_in, w_out, b_out):
    """`sum_i |G_i| * ((|x| |W1| + |b1|) |W2| + |b2|)`: a bound on every term `dense_moe` sums.

    Rounding in a low-precision dtype changes an output by a fraction of
    this, not of the output itself: terms of opposite sign can cancel to
    almost nothing. The activations (relu, tanh, linear) are bounded by
    |h| and 1-Lipschitz, so the bound holds inside each expert too.
    """
    out = 0.0
    for e in range(w_in.shape[0]):
        hidden = np.abs(x) @ np.abs(w_in[e]) + (0 if b_in is None else np.abs(b_in[e]))
        term = hidden @ np.abs(w_out[e]) + (0 if b_out is None else np.abs(b_out[e]))
        out = out + np.abs(gates[:, e : e + 1]) * term
    return out + np.zeros((len(x), w_out.shape[-1]))


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


def rms_normalize(x):
    """Each token scaled to unit root mean square: RMSNorm without a gain (Zhang & Sennrich 2019)."""
    return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + 1e-6)


def top_k_gate(x, w_gate, k, normalize=True):
    """`TopKGateRouter`: `Softmax(KeepTopK(x_hat W_g, k))`, W_g as used (m times the stored one).

    Returns (logits [T, n], dense gates [T, n]).
    """
    if normalize:
        x = rms_normalize(x)
    logits, gates, _ = noisy_top_k(x, w_gate, np.zeros_like(w_gate), None, k, 0.0, train=False)
    return logits, gates


def softmax(logits):
    """Row-wise softmax of [tokens, n] logits."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def dense_gates(token_id, expert_id, weight, num_tokens, num_experts):
    """[tokens, n] gates from flat assignments; expert id `num_experts` (unrouted) adds nothing."""
    dense = np.zeros((num_tokens, num_experts + 1))
    np.add.at(dense, (np.asarray(token_id), np.asarray(expert_id)), np.asarray(weight, np.float64))
    return dense[:, :num_experts]


def routing_gates(routing, num_tokens, num_experts):
    """[tokens, n] gates of a router's `Routing` (its token_id, expert_id and weight)."""
    return dense_gates(routing.token_id, routing.expert_id, routing.weight, num_tokens, num_experts)


def capacity_slots(capacity_factor, num_assignments, num_experts):
    """`ceil(capacity_factor * A / n)`, with the factor the exact decimal it is written as.

    At most A: an expert never receives more than every assignment.
    """
    return min(math.ceil(Fraction(repr(float(capacity_factor))) * num_assignments / num_experts), num_assignments)


def kept_by_capacity(expert_id, num_experts, capacity):
    """[A] bool: each expert keeps its first `capacity` assignments in list order."""
    used = np.zeros(num_experts + 1, int)
    kept = np.zeros(len(expert_id), bool)
    for i, e in enumerate(np.asarray(expert_id)):
        if e < num_experts:
            kept[i] = used[e] < capacity
            used[e] += 1
    return kept


def batchwise_gates(gates, m, valid):
    """Appendix F while training: `(M_batchwise, G)`.

    M keeps the top m of each column among valid tokens; then
    G = G_sigma * M / sum_j G_sigma_j M_j (zero for a token no expert kept).
    """
    mask = np.zeros_like(gates)
    scores = np.where(valid[:, None], gates, -np.inf)
    for i in range(gates.shape[1]):
        mask[np.argsort(-scores[:, i], kind="stable")[:m], i] = 1.0
    mask *= valid[:, None]
    kept = gates * mask
    total = kept.sum(axis=1, keepdims=True)
    return mask, np.divide(kept, total, out=np.zeros_like(kept), where=total > 0)


def threshold_gates(gates, thresholds, candidates, valid):
    """Appendix F at inference: `(keep, G)`.

    Each token keeps those of its `candidates` highest gates that exceed
    their threshold, renormalised over them (zero where none does).
    """
    top = np.zeros_like(gates, bool)
    np.put_along_axis(top, np.argsort(-gates, axis=1, kind="stable")[:, :candidates], True, axis=1)
    keep = top & (gates > thresholds) & valid[:, None]
    kept = gates * keep
    total = kept.sum(axis=1, keepdims=True)
    return keep, np.divide(kept, total, out=np.zeros_like(kept), where=total > 0)


def hierarchical_top_k(
    x, weights, noise, k_primary, k_secondary, noise_epsilon, train=True, valid=None, capacity=None
):
    """Appendix B token by token: the two-level gates, Importance_H, Load_H.

    Args:
        x: [T, d] tokens.
        weights: `(primary W_g [d, a], primary W_noise [d, a], W_g [a, d, b],
            W_noise [a, d, b])`.
        noise: `(primary [T, a], secondary [T, a, b])` standard-normal draws.
        valid: [T] bool or None.
        capacity: None, or the (token, group) pairs each group gates, taken
            in primary-choice-major order; later pairs get no expert.

    Returns:
        `(gates [T, a*b], importance [a*b], load [a*b], dropped)`, dropped
        the assignments lost to the group capacity.
    """
    wp, wnp, ws, wns = weights
    primary_noise, secondary_noise = noise
    t_count, a = len(x), wp.shape[1]
    b = ws.shape[2]
    valid = np.ones(t_count, bool) if valid is None else valid
    hp, gp, sp = noisy_top_k(x, wp, wnp, primary_noise, k_primary, noise_epsilon, train=train)
    gp = gp * valid[:, None]
    if train and k_primary < a:
        primary_load = smooth_load(x[valid], wp, hp[valid], sp[valid], k_primary)
    else:
        primary_load = (gp > 0).sum(axis=0).astype(float)
    ranked = np.argsort(-hp, axis=1, kind="stable")[:, :k_primary]
    member = np.zeros((t_count, a), bool)  # (token, group) pairs that are gated
    used = np.zeros(a, int)
    for choice in range(k_primary):
        for token in np.flatnonzero(valid):
            group = ranked[token, choice]
            member[token, group] = capacity is None or used[group] < capacity
            used[group] += 1
    gates, load = np.zeros((t_count, a * b)), np.zeros(a * b)
    for i in range(a):
        hi, gi, si = noisy_top_k(x, ws[i], wns[i], secondary_noise[:, i], k_secondary, noise_epsilon, train=train)
        rows = member[:, i]
        gates[rows, i * b : (i + 1) * b] = gp[rows, i : i + 1] * gi[rows]
        if not rows.any():
            continue
        if train and k_secondary < b:
            secondary_load = smooth_load(x[rows], ws[i], hi[rows], si[rows], k_secondary)
        else:
            secondary_load = (gi[rows] > 0).sum(axis=0)
        load[i * b : (i + 1) * b] = primary_load[i] * secondary_load / rows.sum()
    dropped = k_secondary * (k_primary * valid.sum() - member.sum())
    return gates, gates.sum(axis=0), load, dropped


# Routers beyond the 2017 paper, each from its own paper's equations.


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def top_k_routing(x, w_gate, k, normalize=False):
    """Softmax over all experts, then the top k (Fedus et al. 2022, section 2.2; Mixtral).

    Returns (probabilities [T, E], dense gates [T, E], choices [T, k]).
    """
    p = softmax(x @ w_gate)
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
    scores = softmax(x @ w_gate)
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
    s = sigmoid(logits) if affinity == "sigmoid" else softmax(logits)
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


def gelu(x):
    """The exact GELU, `x * Phi(x)` (Keras's default, not the tanh approximation)."""
    return x * normal_cdf(x)


def silu(x):
    return x * sigmoid(x)


# Derivatives of the gated experts' activations, from their formulas.
ACTIVATION_DERIVATIVES = {
    "silu": lambda a: sigmoid(a) * (1 + a * (1 - sigmoid(a))),
    "gelu": lambda a: normal_cdf(a) + a * np.exp(-0.5 * a**2) / math.sqrt(2 * math.pi),
    "sigmoid": lambda a: sigmoid(a) * (1 - sigmoid(a)),
}
ACTIVATIONS = {"silu": silu, "gelu": gelu, "sigmoid": lambda a: sigmoid(a)}


def gated_expert(x, w_gate, b_gate, w_in, b_in, w_out, b_out, activation):
    """A gated linear unit expert (Shazeer 2020): `(act(x W + b) * (x V + c)) W2 + b2`."""
    gate = x @ w_gate + (0 if b_gate is None else b_gate)
    linear = x @ w_in + (0 if b_in is None else b_in)
    return (ACTIVATIONS[activation](gate) * linear) @ w_out + (0 if b_out is None else b_out)


def dense_gated_moe(x, gates, w_gate, b_gate, w_in, b_in, w_out, b_out, activation):
    """Every gated expert on every token, weighted by the (sparse) gates."""
    out = 0.0
    for e in range(w_in.shape[0]):
        biases = [None if b is None else b[e] for b in (b_gate, b_in, b_out)]
        expert_out = gated_expert(x, w_gate[e], biases[0], w_in[e], biases[1], w_out[e], biases[2], activation)
        out = out + gates[:, e : e + 1] * expert_out
    return out


def dense_gated_moe_magnitude(x, gates, w_gate, b_gate, w_in, b_in, w_out, b_out):
    """A bound on every term `dense_gated_moe` sums, as `dense_moe_magnitude` for plain experts.

    `|act(a)| <= |a| + 1` for the gated activations (silu and gelu are at
    most |a|, sigmoid at most 1), so `(|gate| + 1) * |linear|` bounds each
    hidden unit.
    """
    out = 0.0
    for e in range(w_in.shape[0]):
        gate = np.abs(x) @ np.abs(w_gate[e]) + (0 if b_gate is None else np.abs(b_gate[e]))
        linear = np.abs(x) @ np.abs(w_in[e]) + (0 if b_in is None else np.abs(b_in[e]))
        term = ((gate + 1) * linear) @ np.abs(w_out[e]) + (0 if b_out is None else np.abs(b_out[e]))
        out = out + np.abs(gates[:, e : e + 1]) * term
    return out + np.zeros((len(x), w_out.shape[-1]))


def gated_expert_gradients(x, w_gate, b_gate, w_in, b_in, w_out, b_out, d_out, activation):
    """Gradients of `sum(gated_expert(x) * d_out)` by the chain rule.

    Returns a dict with `x`, `w_gate`, `w_in`, `w_out` and, with biases,
    `b_gate`, `b_in`, `b_out`.
    """
    gate = x @ w_gate + (0 if b_gate is None else b_gate)
    linear = x @ w_in + (0 if b_in is None else b_in)
    activated = ACTIVATIONS[activation](gate)
    hidden = activated * linear
    d_hidden = d_out @ w_out.T
    d_gate = d_hidden * linear * ACTIVATION_DERIVATIVES[activation](gate)
    d_linear = d_hidden * activated
    grads = {
        "x": d_gate @ w_gate.T + d_linear @ w_in.T,
        "w_gate": x.T @ d_gate,
        "w_in": x.T @ d_linear,
        "w_out": hidden.T @ d_out,
    }
    if b_gate is not None:
        grads.update(b_gate=d_gate.sum(axis=0), b_in=d_linear.sum(axis=0), b_out=d_out.sum(axis=0))
    return grads
