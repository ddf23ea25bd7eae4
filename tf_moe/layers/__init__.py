"""Keras layers of tf_moe."""

from tf_moe.layers.feed_forward_experts import FeedForwardExperts
from tf_moe.layers.moe import MoE
from tf_moe.layers.noisy_top_k_gate import NoisyTopKGate
