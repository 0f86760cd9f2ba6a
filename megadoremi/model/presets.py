"""Model presets with the DoReMi paper's shapes (Xie et al. 2023, Table in ../shared/DOREMI.md) plus ``tiny``.

All presets: GELU MLP, tied embeddings, LayerNorm, no biases; with the paper's 256k vocabulary the 280M preset
has ~85M non-embedding and ~197M embedding parameters, as the paper states.
"""

from megadoremi.model.gpt import GPTConfig

# name: (layers, heads, head_dim, d_model, ffn)
PRESETS = {
    "tiny": (2, 4, 16, 64, 256),
    "70m": (3, 4, 64, 256, 1024),
    "150m": (6, 8, 64, 512, 2048),
    "280m": (12, 12, 64, 768, 3072),
    "510m": (12, 16, 64, 1024, 8192),
    "760m": (12, 20, 64, 1280, 8192),
    "1b": (16, 32, 64, 2048, 8192),
    "8b": (32, 32, 128, 4096, 24576),
}

PAPER_VOCAB_SIZE = 256_000


def gpt_config_from_preset(preset: str, vocab_size: int, max_seq_length: int = 1024, **overrides) -> GPTConfig:
    """A GPTConfig for ``preset`` (case-insensitive, e.g. "280M") with the tokenizer's vocabulary size."""
    key = str(preset).lower()
    if key not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    layers, heads, head_dim, d_model, ffn = PRESETS[key]
    config = GPTConfig(
        vocab_size=vocab_size, num_layers=layers, num_heads=heads, head_dim=head_dim, d_model=d_model,
        ffn_dim=ffn, max_seq_length=max_seq_length,
    )
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise ValueError(f"model.{name}: unknown model field")
        setattr(config, name, value)
    config.validate()
    return config
