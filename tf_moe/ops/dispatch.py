"""Sparse dispatch and combine for stacked experts.

Routing is described by a flat list of assignments `(token_id, expert_id,
weight)`. `dispatch` packs the routed tokens into a per-expert buffer
[num_experts, capacity, d] with one gather, so all experts run as one batched
matmul; `combine` weights each slot's expert output by its assignment's gate
value and sums it into its token with a segment sum. Slot positions come from
a stable sort by expert id, so the cost is O(A log A + A*d) for A
assignments, independent of the number of experts: no [tokens, experts,
capacity] one-hot tensors.
"""

import fractions
from typing import NamedTuple

import tensorflow as tf


def token_choice_assignments(expert_index, expert_weight, valid=None, num_experts=None):
    """Flattens per-token top-k routing into assignments, choice-major.

    All first choices come before all second choices, so when capacity runs
    out the assignments that are dropped are the lower-ranked ones.

    Args:
        expert_index: [tokens, k] int32.
        expert_weight: [tokens, k] float.
        valid: optional [tokens] bool; invalid tokens get expert id
            `num_experts`, which dispatch ignores.
        num_experts: needed when `valid` is given.

    Returns:
        `(token_id, expert_id, weight)`, each of shape [k * tokens].
    """
    expert_index = tf.cast(expert_index, tf.int32)
    if valid is not None:
        expert_index = tf.where(valid[:, None], expert_index, num_experts)
    num_tokens = tf.shape(expert_index)[0]
    token_id = tf.tile(tf.range(num_tokens, dtype=tf.int32), [tf.shape(expert_index)[1]])
    expert_id = tf.reshape(tf.transpose(expert_index), [-1])
    weight = tf.reshape(tf.transpose(expert_weight), [-1])
    return token_id, expert_id, weight


# Largest denominator `q * n` for which the tensor path's int64 maths cannot
# overflow (see `_ceil_ratio`).
_MAX_TENSOR_DENOMINATOR = 2**46


def capacity_fraction(capacity_factor, num_experts):
    """The capacity factor as an exact fraction p/q with `q * num_experts < 2**46`.

    The fraction of its shortest decimal: 1.25 is 5/4 and 0.0015 is 3/2000,
    exactly what the user wrote (the binary float 0.0015 is slightly above
    3/2000, which would round some capacities up by one slot). A decimal too
    long for that bound (a computed factor such as 1/3, 0.3333333333333333)
    becomes the nearest fraction with a small enough denominator (1/3); one
    below the smallest such fraction becomes it, which gives the same one slot
    for any non-empty batch. Factors above `num_experts` become it: a
    capacity of every assignment already drops nothing.
    """
    ratio = min(fractions.Fraction(repr(float(capacity_factor))), fractions.Fraction(num_experts))
    max_denominator = (_MAX_TENSOR_DENOMINATOR - 1) // num_experts
    if ratio.denominator > max_denominator:
        ratio = max(ratio.limit_denominator(max_denominator), fractions.Fraction(1, max_denominator))
    return ratio


def static_capacity(capacity_factor, num_assignments, num_experts):
    """`ceil(capacity_factor * A / n)` slots per expert, computed exactly.

    With the factor as the exact fraction p/q of `capacity_fraction`, the
    result is `ceil(p * A / (q * n))`: at least one slot whenever A > 0, 0
    for an empty batch, at most A. A Python int when A is a Python int.
    Otherwise an int32 tensor from integer-only ops (int64 inside, no
    floats), which XLA can still evaluate at compile time from the input
    shapes; both give the same capacity.

    Args:
        capacity_factor: finite float > 0 (see `checks.check_capacity_factor`).
        num_assignments: A, an int or an integer scalar tensor (< 2**31).
        num_experts: n.

    Returns:
        int, or an int32 scalar tensor.
    """
    ratio = capacity_fraction(capacity_factor, num_experts)
    numerator, denominator = ratio.numerator, ratio.denominator * num_experts
    if isinstance(num_assignments, int):
        return -(-numerator * num_assignments // denominator)
    return tf.cast(_ceil_ratio(numerator, denominator, num_assignments), tf.int32)


def _ceil_ratio(p, d, a):
    """`ceil(p * a / d)` for Python ints p >= 0, 0 < d < 2**46 and a tensor 0 <= a < 2**32.

    Long division of `r * a` (r = p mod d) in base 2**16 keeps every int64
    product below `d * 2**17` < 2**63.
    """
    base = 2**16
    a = tf.cast(a, tf.int64)
    whole, r = divmod(p, d)
    high, low = a // base, a % base
    q1, r1 = (r * high) // d, (r * high) % d
    rest = r1 * base + r * low
    floor = whole * a + q1 * base + rest // d
    return floor + tf.cast(rest % d > 0, tf.int64)


def expert_positions(expert_id, num_experts):
    """Rank of each assignment among the assignments to the same expert.

    Args:
        expert_id: [A] int32, values in [0, num_experts]; `num_experts` marks
            assignments to ignore.
        num_experts: number of experts.

    Returns:
        `(position, counts)`: [A] int32 arrival order within the expert
        (assignment order is kept), and [num_experts] int32 tokens per expert.
    """
    order = tf.argsort(expert_id, stable=True)
    sorted_ids = tf.gather(expert_id, order)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(expert_id), expert_id, num_experts + 1)
    starts = tf.cumsum(counts, exclusive=True)
    sorted_position = tf.range(tf.size(expert_id)) - tf.gather(starts, sorted_ids)
    # A scatter, not invert_permutation: XLA tries to constant-fold the
    # latter's input and fails when it comes from another dispatch.
    position = tf.scatter_nd(order[:, None], sorted_position, tf.shape(expert_id))
    return position, counts[:num_experts]


def dispatch(tokens, token_id, expert_id, num_experts, capacity=None, offset=0):
    """Packs routed tokens into a [num_experts, capacity, d] buffer.

    Args:
        tokens: [T, d] token features.
        token_id: [A] int32 token of each assignment.
        expert_id: [A] int32 expert of each assignment (`num_experts` =
            ignored).
        num_experts: number of experts n.
        capacity: slots per expert. An int (static: XLA- and TPU-friendly)
            or a scalar tensor; assignments beyond it are dropped. `None`
            uses the largest expert's count, so nothing is dropped (dynamic
            shape).
        offset: the first position within each expert that gets a slot
            (an int or a scalar tensor): the buffer holds each expert's
            assignments `offset` to `offset + capacity - 1`, so successive
            offsets cover an expert's assignments window by window.

    Returns:
        `(buffer, slot, kept, counts)`: the [n, capacity, d] buffer (empty
        slots are zero), the [A] flat buffer slot of each assignment, the [A]
        bool mask of assignments that got a slot, and [n] int32 counts of
        assignments routed to each expert before any drop.
    """
    position, counts = expert_positions(expert_id, num_experts)
    if capacity is None:
        capacity = tf.reduce_max(tf.concat([counts, [0]], axis=0))
    position = position - offset
    kept = tf.logical_and(expert_id < num_experts, tf.logical_and(position >= 0, position < capacity))
    num_slots = num_experts * capacity
    # Assignments without a slot all write to one extra slot that is cut off.
    slot = tf.where(kept, expert_id * capacity + position, num_slots)
    units = tokens.shape[-1] or tf.shape(tokens)[-1]
    buffer = tf.reshape(_fill_slots(tokens, token_id, slot, num_slots), [num_experts, capacity, units])
    return buffer, slot, kept, counts


def _fill_slots(tokens, token_id, slot, num_slots):
    """[num_slots, d]: the token of the assignment in each slot, zeros where none is.

    The gradient is written out: a segment sum of the slots' gradients into
    their tokens, where autodiff's sparse gradient would also be masked and
    copied on its way through the zero row's concatenation.
    """
    num_tokens = tf.shape(tokens)[0]
    source = slot_owners(slot, token_id, num_slots, empty=num_tokens)

    @tf.custom_gradient
    def fill(tokens):
        units = tokens.shape[-1] or tf.shape(tokens)[-1]
        # An explicit zero row (not `tokens[:1]`), so that a batch of zero
        # tokens still has one to point at.
        padded = tf.concat([tokens, tf.zeros([1, units], tokens.dtype)], axis=0)

        def gradient(d_slots):
            # Empty slots (source == num_tokens) get segment -1: dropped.
            return tf.math.unsorted_segment_sum(d_slots, tf.where(source < num_tokens, source, -1), num_tokens)

        return tf.gather(padded, source), gradient

    return fill(tokens)


class SplitDispatch(NamedTuple):
    """A dropless dispatch into every expert's first slots and further slots of the fullest experts."""

    buffer: tf.Tensor  # [n, c0, d]: every expert's first c0 assignments
    overflow: tf.Tensor  # [m, c1, d]: assignments c0.. of expert overflow_experts[j] in row j
    overflow_experts: tf.Tensor  # [m] int32: the experts with more than c0 assignments, ascending
    slot: tf.Tensor  # [A] int32: each assignment's row in the flat [n*c0 + m*c1, d] of both buffers
    kept: tf.Tensor  # [A] bool: routed assignments (all of them get a slot)
    counts: tf.Tensor  # [n] int32: assignments per expert


def split_capacity(counts, overflow_cost):
    """`(c0, c1)`: the slots every expert gets, and the further slots of the experts with more.

    Chooses c0 to minimise the rows the experts compute, `n * c0 + m * c1`
    with m the experts holding more than c0 assignments and `c1 = largest
    - c0`, plus `overflow_cost` rows for each of the m experts (what running
    an expert on a second buffer costs beyond its rows). The least cost is
    at c0 = 0 or at one of the counts: between two counts m is constant and
    the cost grows with c0. c0 = largest (no second buffer) is always a
    candidate.

    Args:
        counts: [n] int32 assignments per expert.
        overflow_cost: float >= 0, in rows.

    Returns:
        Two int32 scalars.
    """
    candidates = tf.sort(tf.concat([[0], counts], axis=0))
    largest = candidates[-1]
    # Experts holding more than each candidate: O(n log n), not an [n, n] comparison.
    overflowing = tf.size(counts) - tf.searchsorted(candidates[1:], candidates, side="right", out_type=tf.int32)
    c, m = tf.cast(candidates, tf.float64), tf.cast(overflowing, tf.float64)
    rows = tf.cast(tf.size(counts), tf.float64) * c + m * (tf.cast(largest, tf.float64) - c + overflow_cost)
    first = tf.gather(candidates, tf.argmin(rows, output_type=tf.int32))
    return first, largest - first


def split_dispatch(tokens, token_id, expert_id, num_experts, overflow_cost):
    """Dropless dispatch into a `SplitDispatch`: padding only where the fullest experts need it.

    `dispatch(..., capacity=None)` pads every expert to the fullest one's
    count. Here every expert gets `c0` slots and the m experts with more
    assignments `c1` further ones, `(c0, c1)` from `split_capacity`;
    `tf_moe.ops.expert_matmul.split_feed_forward` runs experts on both
    buffers. `combine` takes the experts' outputs on both, flattened and
    concatenated (buffer first), with this `slot` and `kept`.

    Args:
        tokens, token_id, expert_id, num_experts: as in `dispatch`.
        overflow_cost: what running one expert on the second buffer costs,
            in rows of the buffer (see `split_capacity`).

    Returns:
        A `SplitDispatch`.
    """
    position, counts = expert_positions(expert_id, num_experts)
    first, further = split_capacity(counts, overflow_cost)
    overflowing = counts > first
    overflow_experts = tf.cast(tf.where(overflowing)[:, 0], tf.int32)
    overflow_row = tf.cumsum(tf.cast(overflowing, tf.int32), exclusive=True)
    kept = expert_id < num_experts
    main_slots = num_experts * first
    num_slots = main_slots + tf.size(overflow_experts) * further
    routed_expert = tf.minimum(expert_id, num_experts - 1)
    overflow_slot = main_slots + tf.gather(overflow_row, routed_expert) * further + position - first
    slot = tf.where(kept, tf.where(position < first, expert_id * first + position, overflow_slot), num_slots)
    units = tokens.shape[-1] or tf.shape(tokens)[-1]
    buffer, overflow = tf.split(_fill_slots(tokens, token_id, slot, num_slots), [main_slots, num_slots - main_slots])
    return SplitDispatch(
        buffer=tf.reshape(buffer, [num_experts, first, units]),
        overflow=tf.reshape(overflow, [tf.size(overflow_experts), further, units]),
        overflow_experts=overflow_experts,
        slot=slot,
        kept=kept,
        counts=counts,
    )


def slot_owners(slot, values, num_slots, empty):
    """[num_slots]: `values[a]` of the assignment a in each slot, `empty` where none is.

    A slot holds at most one assignment; assignments with `slot ==
    num_slots` (no slot) write to an extra entry that is cut off.
    """
    return tf.tensor_scatter_nd_update(tf.fill([num_slots + 1], empty), slot[:, None], values)[:num_slots]


def combine(expert_outputs, slot, kept, token_id, weight, num_tokens):
    """Weighted sum of each token's expert outputs; dropped ones add zero.

    Args:
        expert_outputs: [n, capacity, o] outputs of the experts on the buffer,
            or [slots, o]: those of `split_dispatch`'s two buffers, flat and
            concatenated.
        slot, kept: from `dispatch` (or `split_dispatch`).
        token_id: [A] int32 token of each assignment.
        weight: [A] gate value of each assignment.
        num_tokens: T.

    Returns:
        [T, o] in the dtype of `expert_outputs`.
    """
    units = expert_outputs.shape[-1]
    flat = tf.reshape(expert_outputs, [-1, units])
    num_slots = tf.shape(flat)[0]
    weight = tf.where(kept, tf.cast(weight, flat.dtype), tf.zeros((), flat.dtype))
    # Summed in slot space: each slot's token and gate value, a scatter of
    # [A] scalars, rather than a gather of [A, o] rows per assignment.
    owner = slot_owners(slot, token_id, num_slots, empty=-1)
    slot_weight = slot_owners(slot, weight, num_slots, empty=tf.zeros((), flat.dtype))
    return _weighted_segment_sum(flat, slot_weight, owner, num_tokens)


def _weighted_segment_sum(flat, slot_weight, owner, num_tokens):
    """`out[t] = sum over slots s with owner[s] == t of slot_weight[s] * flat[s]`; `owner == -1` adds nothing.

    The gradient is written out: one gather of the tokens' gradients into
    slot space serves both the rows' and the gate values' gradients (where
    autodiff would also mask the gather for the owner -1 slots).
    """

    @tf.custom_gradient
    def forward(flat, slot_weight):
        outputs = tf.math.unsorted_segment_sum(flat * slot_weight[:, None], owner, num_tokens)

        def gradient(d_outputs):
            units = flat.shape[-1]
            # Slots without an owner read this zero row.
            padded = tf.concat([d_outputs, tf.zeros([1, units], d_outputs.dtype)], axis=0)
            d_rows = tf.gather(padded, tf.where(owner < 0, num_tokens, owner))
            return d_rows * slot_weight[:, None], tf.reduce_sum(d_rows * flat, axis=-1)

        return outputs, gradient

    return forward(flat, slot_weight)


# The largest static capacity of `dropless_static`, in multiples of the mean
# load: its buffers hold 4x the assignments; beyond it the experts run window
# by window, so a collapsed routing costs time, not n-times-larger buffers.
_LARGEST_DROPLESS_FACTOR = 4.0


def dropless_capacity_factors(num_experts):
    """The capacities, in multiples of the mean load A / n, that `dropless_static` picks from.

    Eighths from the mean to twice it (a balanced or lightly skewed batch
    pads at most an eighth of the mean per expert), then 4; half the mean
    for batches of mostly masked tokens. The last, `min(num_experts, 4)`,
    is also the window of batches whose largest expert holds more. Each
    is a branch to trace and compile, so they are few.
    """
    largest = min(float(num_experts), _LARGEST_DROPLESS_FACTOR)
    factors = [0.5] + [1 + i / 8 for i in range(9)]
    return [f for f in factors if f < largest] + [largest]


def dropless_static(tokens, token_id, expert_id, weight, num_experts, num_tokens, experts):
    """Dropless dispatch, experts and combine with static shapes, for XLA.

    The dropless capacity (the largest expert's count) is data-dependent,
    which XLA cannot compile. Here each capacity of
    `dropless_capacity_factors` is a branch of one `tf.switch_case` with
    static shapes, and the smallest that holds the largest expert runs: the
    same outputs as `dispatch(..., capacity=None)`, with a little more
    zero padding. A batch whose largest expert holds more than the last
    capacity C (4x the mean load) runs the experts window by window in a
    loop, on each expert's assignments 0..C-1, C..2C-1, ..., as many
    windows as the largest expert needs: every buffer is at most 4x the
    assignments, where one branch per multiple of the mean up to
    `num_experts` would need buffers of `num_experts` times the
    assignments (gigabytes for hundreds of experts) when the routing
    collapses. XLA allocates the saved activations of every branch of a
    differentiated switch, so the gradient is written here: its own switch
    recomputes the chosen branch's forward pass (window by window for the
    loop), at the price of one more forward pass through the experts.

    Args:
        tokens: [T, d].
        token_id, expert_id, weight: the [A] assignments (`expert_id ==
            num_experts`: not routed).
        num_experts: n.
        num_tokens: T, an int or a scalar tensor.
        experts: callable mapping an [n, capacity, d] buffer to [n, capacity, o]
            (e.g. `FeedForwardExperts`); its variables get gradients.

    Returns:
        [T, o], as `combine(experts(buffer), ...)` after a dropless `dispatch`.
    """
    plan = _static_plan(expert_id, num_experts)

    def run(capacity, tokens, weight, offset=0):
        buffer, slot, kept, _ = dispatch(tokens, token_id, expert_id, num_experts, capacity, offset)
        return combine(experts(buffer), slot, kept, token_id, weight, num_tokens)

    @tf.custom_gradient
    def forward(tokens, weight):
        outputs = _at_chosen_capacity(plan, lambda capacity, offset: [run(capacity, tokens, weight, offset)])[0]

        def gradient(d_outputs, variables=()):
            def grads_of(capacity, offset):
                with tf.GradientTape() as tape:
                    tape.watch([tokens, weight])
                    out = run(capacity, tokens, weight, offset)
                grads = tape.gradient(
                    out, [tokens, weight, *variables], output_gradients=d_outputs,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                # Dense here, where the shapes are static (a gather's gradient is sparse).
                return [tf.convert_to_tensor(g) for g in grads]

            grads = _at_chosen_capacity(plan, grads_of)
            return grads[:2], grads[2:]

        return outputs, gradient

    return forward(tokens, weight)


class _StaticPlan(NamedTuple):
    """Which static capacity `dropless_static` runs a batch at."""

    capacities: list  # the capacities of `dropless_capacity_factors`, one branch each
    window: int  # the last capacity, the window of the windowed branch
    windows_needed: bool  # whether the windowed branch exists (more than 4 experts)
    branch: tf.Tensor  # the branch that runs: the smallest capacity that holds the largest expert
    num_windows: tf.Tensor  # windows of the largest expert, for the windowed branch


def _static_plan(expert_id, num_experts):
    """The `_StaticPlan` of a batch's assignments to `num_experts` experts."""
    num_assignments = tf.size(expert_id) if expert_id.shape[0] is None else int(expert_id.shape[0])
    factors = dropless_capacity_factors(num_experts)
    capacities = [static_capacity(factor, num_assignments, num_experts) for factor in factors]
    window = capacities[-1]
    _, counts = expert_positions(expert_id, num_experts)
    largest = tf.reduce_max(tf.concat([counts, [0]], axis=0))
    return _StaticPlan(
        capacities=capacities,
        window=window,
        # Up to 4 experts the last capacity holds every assignment: no window loop.
        windows_needed=factors[-1] < num_experts,
        # len(capacities) (every capacity too small) is the windowed branch.
        branch=tf.reduce_sum(tf.cast(tf.stack(capacities) < largest, tf.int32)),
        num_windows=(largest + window - 1) // tf.maximum(window, 1),
    )


def _at_chosen_capacity(plan, step):
    """`step(capacity, offset)`, a list of tensors, at the plan's branch: one capacity, or summed over windows."""

    def windowed():
        _, total = tf.while_loop(
            lambda i, _: i < plan.num_windows,
            lambda i, total: (i + 1, [a + b for a, b in zip(total, step(plan.window, i * plan.window))]),
            (tf.constant(1, plan.num_windows.dtype), step(plan.window, 0)),
        )
        return total

    branches = [lambda c=c: step(c, 0) for c in plan.capacities]
    return tf.switch_case(plan.branch, branches + ([windowed] if plan.windows_needed else []))
