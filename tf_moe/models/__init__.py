"""The paper's models: the MoE LSTM language model, baselines, seq2seq."""

from tf_moe.models.lstm_lm import BASELINES, lstm_lm, moe_layer
from tf_moe.models.ops_counter import layer_ops_per_timestep, ops_per_timestep
from tf_moe.models.seq2seq import Seq2SeqDecoder, seq2seq
from tf_moe.models.transformer_lm import TRANSFORMER_KINDS, transformer_lm, upcycle_transformer_lm
