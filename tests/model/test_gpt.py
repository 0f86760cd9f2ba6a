import pytest
import torch

from megadoremi.model import GPT, PRESETS, gpt_config_from_preset, token_losses
from megadoremi.model.gpt import GPTConfig
from megadoremi.model.presets import PAPER_VOCAB_SIZE


def test_8b_preset_on_meta_device_has_the_papers_size():
    config = gpt_config_from_preset("8b", PAPER_VOCAB_SIZE)
    with torch.device("meta"):
        model = GPT(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == config.num_parameters()
    # 32 layers x (4 d^2 attention + 2 d ffn MLP + 2 LayerNorms), d = 4096, ffn = 24576; vocab 256k tied.
    d, ffn = 4096, 24576
    assert config.num_parameters(embedding=False) == 32 * (4 * d * d + 2 * d * ffn + 4 * d) + 2 * d
    assert 8.5e9 < config.num_parameters(embedding=False) < 8.7e9
    assert count == config.num_parameters(embedding=False) + 256_000 * d


def test_280m_preset_matches_the_paper_split():
    config = gpt_config_from_preset("280M", PAPER_VOCAB_SIZE)
    non_embedding = config.num_parameters(embedding=False)
    embedding = config.num_parameters() - non_embedding
    assert abs(non_embedding - 85e6) / 85e6 < 0.01
    assert abs(embedding - 197e6) / 197e6 < 0.01


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_counts(preset):
    config = gpt_config_from_preset(preset, 50_000)
    with torch.device("meta"):
        model = GPT(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    assert config.padded_vocab_size % 128 == 0 and config.padded_vocab_size >= 50_000


@pytest.mark.parametrize("mlp,tied,norm", [("gelu", True, "layernorm"), ("swiglu", False, "rmsnorm")])
def test_forward_shapes_causality_and_counts(mlp, tied, norm):
    config = gpt_config_from_preset("tiny", 1000, 32, mlp=mlp, tied_embeddings=tied, norm=norm)
    model = GPT(config, seed=3)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    tokens = torch.randint(0, 1000, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, config.padded_vocab_size)
    # Causal: changing a later token does not change earlier logits.
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 1000
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])
    losses = token_losses(logits, tokens)
    assert losses.shape == (2, 16) and losses.dtype == torch.float32


def test_initialisation_is_per_layer_and_seeded():
    config = gpt_config_from_preset("tiny", 1000, 32)
    a, b, c = GPT(config, seed=1), GPT(config, seed=1), GPT(config, seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() >= 2:
            assert not torch.equal(pa, pc), name
    # A deeper model shares its first layers' initial weights (init depends only on seed and layer number).
    deeper = GPT(gpt_config_from_preset("tiny", 1000, 32, num_layers=4), seed=1)
    assert torch.equal(deeper.blocks[0].attn.qkv.weight, a.blocks[0].attn.qkv.weight)
    assert torch.equal(deeper.embedding.weight, a.embedding.weight)
    # Residual projections use the scaled init std / sqrt(2 L).
    std = a.blocks[0].mlp.down.weight.std().item()
    assert std < 0.02 / (2 * config.num_layers) ** 0.5 * 1.3


def test_pipeline_layers_start_from_the_same_weights_as_the_model():
    pytest.importorskip("deepspeed")
    from megadoremi.model.pipeline import pipeline_layer_specs

    for tied in (True, False):
        config = gpt_config_from_preset("tiny", 1000, 32, tied_embeddings=tied)
        model = GPT(config, seed=5)
        layers = [spec.build() for spec in pipeline_layer_specs(config, seed=5)]
        assert torch.equal(layers[0].weight, model.embedding.weight)
        for block, reference in zip(layers[1:1 + config.num_layers], model.blocks):
            for p, q in zip(block.parameters(), reference.parameters()):
                assert torch.equal(p, q)
        # Run the pipeline layers sequentially: same logits as the model.
        tokens = torch.randint(0, 1000, (2, 8))
        x = tokens
        for spec, layer in zip(pipeline_layer_specs(config, seed=5), layers):
            x = spec.forward_fn(layer, x) if getattr(spec, "forward_fn", None) else layer(x)
        torch.testing.assert_close(x, model(tokens))


def test_invalid_model_config():
    with pytest.raises(ValueError, match="head_dim must be even"):
        GPTConfig(vocab_size=10, num_layers=1, num_heads=1, head_dim=3, d_model=4, ffn_dim=4).validate()
    with pytest.raises(ValueError, match="unknown preset"):
        gpt_config_from_preset("3b", 100)
