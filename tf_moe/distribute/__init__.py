"""Distributed training: strategies by name, expert parallelism, cluster checkpoints."""

from tf_moe.distribute.checkpoints import ClusterBackup, save_weights
from tf_moe.distribute.expert_parallel import ExpertParallelMoE
from tf_moe.distribute.optimizers import ExpertParallelLossScaleOptimizer, expert_parallel_optimizer
from tf_moe.distribute.strategies import get_strategy
