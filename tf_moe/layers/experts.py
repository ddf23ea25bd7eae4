"""The experts contract of `MoELayer`: the `Experts` base layer."""

import keras

from tf_moe.layers.checks import check_positive_int


class Experts(keras.layers.Layer):
    """Base layer of the expert banks of `MoELayer`.

    An expert bank holds `num_experts` experts and runs all of them at once
    on a dispatch buffer: it maps `[num_experts, slots, d]` to
    `[num_experts, slots, output_units]`, expert `i` applying its own
    weights to row `i`. The contract every bank implements:

    * `num_experts` and `output_units` attributes (`output_units` None
      until built means "the input width"; `MoELayer` asks for its output
      width by passing `output_units`).
    * `call(inputs)` on a `[num_experts, slots, d]` buffer. Each slot is
      one token: its output may depend on that slot and the expert's
      weights only, never on other slots. `MoELayer` pads buffers with zero
      slots and drops their outputs, so the result for a token is the same
      whatever else was routed with it (tests compare the sparse layer with
      a dense per-token computation).
    * `ops_per_token()`: multiply-adds of one expert on one token, as the
      paper's Table 1 counts them (needs the layer built).
    * `get_config()` with `num_experts` and `output_units`, so that
      `MoELayer` can save the bank and make a bank of the same kind with
      another number of experts (its shared experts) by
      `from_config({**config, "num_experts": m})`.
    * Optionally, `overflow_cost` (rows, a float) and
      `call_split(inputs, overflow_inputs, overflow_experts)`: the bank on
      every expert's first slots `[num_experts, c0, d]` and on further
      slots `[m, c1, d]` of the experts `overflow_experts` ([m] int32, row j
      for expert `overflow_experts[j]`), returning both outputs. `MoELayer`'s
      dropless dispatch (outside XLA) then pads only the fullest experts
      (`tf_moe.ops.dispatch.split_dispatch`), counting `overflow_cost` rows
      for each expert on the second buffer. `overflow_cost = None`, the
      default, leaves it padding every expert to the fullest one and
      calling `call`. A subclass that changes `call` of a bank with
      `call_split` (`FeedForwardExperts`) must change `call_split` alike
      or set `overflow_cost = None`.
    * Optionally, `broadcasts_tokens = True`: `call` also takes `[1,
      slots, d]`, the same tokens for every expert, and returns `[num_experts,
      slots, output_units]` (with the input's gradient summed over the
      experts); `MoELayer` then runs its shared experts on the tokens
      without a copy per expert. The default, False, gives them the tokens
      repeated to `[num_experts, slots, d]`.
    * Weights stacked along a leading expert axis (`[num_experts, ...]`)
      are what `tf_moe.ExpertParallelMoE` shards; it shards
      `FeedForwardExperts` (plain or gated) and refuses other banks.

    Args:
        num_experts: int, number of experts.
        output_units: int or None, output width of every expert (None: set
            by the subclass in `build`, usually to the input width).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[num_experts, slots, d]`, the tokens routed to each expert.

    Returns:
        `[num_experts, slots, output_units]`.

    Example, a bank of linear experts:

    >>> @keras.saving.register_keras_serializable()
    ... class LinearExperts(tf_moe.Experts):
    ...     def build(self, input_shape):
    ...         self.output_units = self.output_units or input_shape[-1]
    ...         self.kernel = self.add_weight(
    ...             shape=(self.num_experts, input_shape[-1], self.output_units), name="kernel")
    ...     def call(self, inputs):
    ...         return tf.matmul(inputs, self.kernel)
    ...     def ops_per_token(self):
    ...         return self.kernel.shape[1] * self.kernel.shape[2]
    >>> moe = tf_moe.MoELayer(8, 2, experts=LinearExperts(8))
    """

    # Rows of the dispatch buffer that running one expert on a second buffer
    # costs (`call_split`); None: the bank has no `call_split`.
    overflow_cost = None
    # Whether `call` takes [1, slots, d] as the same tokens for every expert.
    broadcasts_tokens = False

    def __init__(self, num_experts, output_units=None, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.output_units = None if output_units is None else check_positive_int("output_units", output_units)

    def check_input_shape(self, input_shape):
        """Raises a ValueError unless `input_shape` is `[num_experts, slots, d]` with known d."""
        if len(input_shape) != 3:
            raise ValueError(
                f"`inputs` of {type(self).__name__} must have shape [num_experts, slots, d], "
                f"got shape {input_shape}."
            )
        if input_shape[0] is not None and input_shape[0] != self.num_experts:
            raise ValueError(
                f"`inputs` axis 0 must equal num_experts={self.num_experts}, got shape {input_shape}."
            )
        if input_shape[-1] is None:
            raise ValueError("The last axis of `inputs` must be known.")

    def call(self, inputs):
        raise NotImplementedError(f"{type(self).__name__} must implement `call`.")

    def call_split(self, inputs, overflow_inputs, overflow_experts):
        """`(call on [n, c0, d], call on [m, c1, d] with experts overflow_experts)`; for banks with `overflow_cost`."""
        raise NotImplementedError(f"{type(self).__name__} has no `call_split`: its `overflow_cost` must be None.")

    def ops_per_token(self):
        """Multiply-adds of one expert on one token."""
        raise NotImplementedError(f"{type(self).__name__} must implement `ops_per_token`.")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_units or input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update({"num_experts": self.num_experts, "output_units": self.output_units})
        return config
