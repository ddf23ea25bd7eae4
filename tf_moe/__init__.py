"""tf_moe: the Sparsely-Gated Mixture-of-Experts layer for TensorFlow and Keras 3."""

__version__ = "0.1.0"  # the one version string; setup.cfg reads it

from tf_moe._startup import import_tensorflow

import_tensorflow()  # before anything else loads TensorFlow: see tf_moe/_startup.py

from tf_moe.layers import FeedForwardExperts, MoE, NoisyTopKGate
from tf_moe.layers import BatchwiseGate, HierarchicalGate, HierarchicalMoE, SoftmaxGate
from tf_moe.distribute import ExpertParallelMoE  # also tf_moe.distribute.get_strategy etc.
from tf_moe.metrics import LoadBalanceMetrics
from tf_moe.ops.gating import cv_squared
from tf_moe import models, training  # the paper's models and training loop

