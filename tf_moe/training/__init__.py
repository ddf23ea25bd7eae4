"""Training: the MoE model's train/test steps, the paper's schedule, callbacks, fused optimizers."""

from tf_moe.training.model import MoEModel, Perplexity, masked_token_cross_entropy
from tf_moe.training.schedules import WarmupInverseSqrtDecay
from tf_moe.training.backup import CrashSafeBackup, epoch_stream, seed_states
from tf_moe.training.callbacks import (
    ResetRecurrentState,
    TrainingSummaries,
    default_callbacks,
    delete_backup,
    expert_loads,
)
from tf_moe.training.fused_optimizers import FusedAdam, FusedAdamW, FusedSGD, fused_optimizer
