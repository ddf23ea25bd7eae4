"""Keras layers of tf_moe."""

from tf_moe.layers.batchwise_gate import BatchwiseGate
from tf_moe.layers.feed_forward_experts import FeedForwardExperts
from tf_moe.layers.hierarchical_gate import HierarchicalGate
from tf_moe.layers.hierarchical_moe import HierarchicalMoE
from tf_moe.layers.moe import MoE
from tf_moe.layers.noisy_top_k_gate import NoisyTopKGate
from tf_moe.layers.softmax_gate import SoftmaxGate
