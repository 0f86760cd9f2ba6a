"""The one FLOPs formula (megadoremi.model.flops) against hand counts."""

from megadoremi.model.flops import flops_per_token
from megadoremi.model.gpt import GPTConfig


def test_flops_per_token_by_hand():
    config = GPTConfig(vocab_size=100, num_layers=2, num_heads=4, head_dim=16, d_model=64, ffn_dim=256)
    flops = flops_per_token(config, seq_length=32)
    # Per layer: qkv 3*64*64 = 12,288 + output 64*64 = 4,096 + MLP 2*64*256 = 32,768 -> 49,152.
    # Logits: 64 * 128 (vocabulary 100 padded to 128) = 8,192. Two layers + logits = 106,496.
    assert flops.matmul_parameters == 106_496
    assert flops.dense == 6 * 106_496 == 638_976
    # QK^T + AV: 2 * 2 * seq * inner forward per layer per token, x3 with backward: 12 * 2 * 64 * 32.
    assert flops.attention == 49_152
    assert flops.total == 688_128


def test_flops_counts_inner_width_swiglu_and_untied_logits():
    # inner (heads * head_dim = 32) differs from d_model (64): the attention matrices are d x inner.
    config = GPTConfig(vocab_size=128, num_layers=1, num_heads=2, head_dim=16, d_model=64, ffn_dim=128,
                       mlp="swiglu", tied_embeddings=False)
    flops = flops_per_token(config, seq_length=10)
    # qkv 3*64*32 = 6,144 + output 32*64 = 2,048 + SwiGLU 3*64*128 = 24,576; logits 64*128 = 8,192 (counted once,
    # tied or not; the embedding lookup is not a matmul).
    assert flops.matmul_parameters == 6_144 + 2_048 + 24_576 + 8_192
    assert flops.attention == 12 * 1 * 32 * 10
