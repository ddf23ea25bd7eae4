"""tf_moe: the Sparsely-Gated Mixture-of-Experts layer for TensorFlow and Keras 3."""

__version__ = "0.1.0"  # the one version string; setup.cfg reads it

from tf_moe._startup import import_tensorflow

import_tensorflow()  # before anything else loads TensorFlow: see tf_moe/_startup.py

from tf_moe.layers import Experts, FeedForwardExperts, HierarchicalMoE, MoE, MoELayer, upcycle
from tf_moe.layers import BatchwiseRouter, HierarchicalRouter, NoisyTopKRouter, SoftmaxRouter
from tf_moe.layers import ExpertChoiceRouter, HashRouter, LossFreeRouter, SwitchRouter, TopKGateRouter, TopKRouter
from tf_moe.layers import PositionEmbedding, Router, Routing
from tf_moe import routers  # routers by name: tf_moe.routers.get("softmax", num_experts=8)
from tf_moe.distribute import ExpertParallelMoE  # also tf_moe.distribute.get_strategy etc.
from tf_moe.metrics import LoadBalanceMetrics
from tf_moe.ops.gating import cv_squared
from tf_moe import models, training  # the paper's models and training loop
from tf_moe import performance  # performance.configure_allocator()

