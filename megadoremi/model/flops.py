"""Training FLOPs per token, the one formula the project uses (MFU in the benchmarks, time estimates in docs).

PaLM appendix B / Megatron convention, per trained token, forward + backward::

    flops_per_token = 6 * P_matmul + 12 * num_layers * inner * seq_length
    P_matmul = num_layers * (4 * d_model * inner + k * d_model * ffn_dim) + d_model * padded_vocab

with inner = num_heads * head_dim, k = 2 (GELU) or 3 (SwiGLU). P_matmul is every weight that multiplies
activations: q, k, v and output projections, the MLP, and the logits projection (counted whether or not it is
tied to the embedding); the embedding lookup, norms, rotary and softmax are not counted. The attention term is
the QK^T and AV matmuls, 2 * 2 * seq * inner per layer per token forward, x3 for forward + backward, over the
full seq x seq square; a causal kernel needs only half of it.
"""

from dataclasses import dataclass

from megadoremi.model.gpt import GPTConfig

FLOPS_FORMULA = (
    "flops_per_token = 6 * P_matmul + 12 * num_layers * inner * seq_length; "
    "P_matmul = num_layers * (4 * d_model * inner + k * d_model * ffn_dim) + d_model * padded_vocab "
    "(inner = heads * head_dim, k = 2 GELU / 3 SwiGLU; logits matmul counted, embedding lookup, norms, rotary, "
    "softmax not); attention = QK^T + AV, 4 * seq * inner per layer per token forward, x3 fwd+bwd, full "
    "seq x seq square (causal half: mfu_causal_attention)"
)


def matmul_parameters(config: GPTConfig) -> int:
    """Weights that multiply activations: attention and MLP matrices of every layer, and the logits matrix."""
    d, inner = config.d_model, config.num_heads * config.head_dim
    mlp = (3 if config.mlp == "swiglu" else 2) * d * config.ffn_dim
    return config.num_layers * (4 * d * inner + mlp) + d * config.padded_vocab_size


@dataclass
class FlopsPerToken:
    """Training FLOPs per token (forward + backward), split into the dense and the attention-score parts."""

    matmul_parameters: int
    dense: int  # 6 * matmul_parameters
    attention: int  # 12 * layers * inner * seq (full square)

    @property
    def total(self) -> int:
        return self.dense + self.attention


def flops_per_token(config: GPTConfig, seq_length: int) -> FlopsPerToken:
    """``6 * P_matmul + 12 * num_layers * inner * seq_length`` (see the module docstring)."""
    params = matmul_parameters(config)
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_length
    return FlopsPerToken(params, 6 * params, attention)
