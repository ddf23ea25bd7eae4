"""Distributed training: strategies by name, and expert parallelism."""

from tf_moe.distribute.expert_parallel import ExpertParallelMoE
from tf_moe.distribute.optimizers import expert_parallel_optimizer
from tf_moe.distribute.strategies import get_strategy
