"""Keras layers of tf_moe: `MoELayer`, its routers and its experts."""

from tf_moe.layers.batchwise_router import BatchwiseRouter
from tf_moe.layers.expert_choice_router import ExpertChoiceRouter
from tf_moe.layers.feed_forward_experts import FeedForwardExperts
from tf_moe.layers.hash_router import HashRouter
from tf_moe.layers.hierarchical_moe import HierarchicalMoE
from tf_moe.layers.hierarchical_router import HierarchicalRouter
from tf_moe.layers.legacy import MoE
from tf_moe.layers.loss_free_router import LossFreeRouter
from tf_moe.layers.moe_layer import MoELayer
from tf_moe.layers.noisy_top_k_router import NoisyTopKRouter
from tf_moe.layers.router import Router, Routing
from tf_moe.layers.softmax_router import SoftmaxRouter
from tf_moe.layers.switch_router import SwitchRouter
from tf_moe.layers.top_k_router import TopKRouter
