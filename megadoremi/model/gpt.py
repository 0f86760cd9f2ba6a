"""Decoder-only GPT in plain PyTorch: pre-norm blocks, rotary positions, SDPA causal attention.

The model knows nothing of parallelism. Every module initialises its own parameters from a generator seeded by
(model seed, layer number), inside its own ``__init__``; so the pipeline form (built stage by stage), ZeRO-3's
``zero.Init`` (which partitions a module's parameters right after its ``__init__``) and the plain model all start
from identical weights.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MLP_KINDS = ("gelu", "swiglu")
NORM_KINDS = ("layernorm", "rmsnorm")


@dataclass
class GPTConfig:
    """Shape of the model. ``vocab_size`` is the tokenizer's; the embedding is padded to ``vocab_multiple``."""

    vocab_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    d_model: int
    ffn_dim: int
    max_seq_length: int = 1024
    mlp: str = "gelu"
    norm: str = "layernorm"
    tied_embeddings: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02
    vocab_multiple: int = 128
    norm_eps: float = 1e-5

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name in ("vocab_size", "num_layers", "num_heads", "head_dim", "d_model", "ffn_dim", "max_seq_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for rotary positions, got {self.head_dim}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"model.mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.norm not in NORM_KINDS:
            raise ValueError(f"model.norm must be one of {NORM_KINDS}, got {self.norm!r}")

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple)

    def num_parameters(self, embedding: bool = True) -> int:
        """Exact parameter count of ``GPT(self)`` (embedding included unless ``embedding=False``)."""
        d, inner = self.d_model, self.num_heads * self.head_dim
        norm = d if self.norm == "rmsnorm" else 2 * d
        mlp = (3 if self.mlp == "swiglu" else 2) * d * self.ffn_dim
        block = 3 * d * inner + inner * d + mlp + 2 * norm  # qkv, attention output, MLP, two norms
        total = self.num_layers * block + norm
        if embedding:
            embed = self.padded_vocab_size * d
            total += embed if self.tied_embeddings else 2 * embed
        return total


def layer_generator(seed: int, layer_number: int) -> torch.Generator:
    """The generator that initialises layer ``layer_number`` (0 = embedding, 1..L = blocks, L+1 = head)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(layer_number))


def _normal(shape, std: float, generator: torch.Generator | None) -> torch.Tensor:
    tensor = torch.empty(shape)
    if generator is not None and not tensor.is_meta:
        tensor.normal_(0.0, std, generator=generator)
    return tensor


class Linear(nn.Module):
    """Bias-free linear layer initialised N(0, std) from a given generator."""

    def __init__(self, in_features: int, out_features: int, std: float, generator: torch.Generator | None):
        super().__init__()
        self.weight = nn.Parameter(_normal((out_features, in_features), std, generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dimension."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind, self.eps = config.norm, config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.d_model))
        self.bias = nn.Parameter(torch.zeros(config.d_model)) if config.norm == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(seq_length: int, head_dim: int, base: float, device, dtype):
    """cos/sin tables of shape (seq, head_dim / 2) for rotary positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension; x: (batch, heads, seq, head_dim)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions through SDPA."""

    def __init__(self, config: GPTConfig, generator, out_std: float):
        super().__init__()
        self.num_heads, self.head_dim, self.rope_base = config.num_heads, config.head_dim, config.rope_base
        inner = config.num_heads * config.head_dim
        self.qkv = Linear(config.d_model, 3 * inner, config.init_std, generator)
        self.out = Linear(inner, config.d_model, out_std, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # (batch, seq, 3 * heads * head_dim) -> 3 x (batch, heads, seq, head_dim)
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rotary_tables(seq, self.head_dim, self.rope_base, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """GELU (two matrices) or SwiGLU (three) feed-forward."""

    def __init__(self, config: GPTConfig, generator, out_std: float):
        super().__init__()
        self.kind = config.mlp
        self.up = Linear(config.d_model, config.ffn_dim, config.init_std, generator)
        self.gate = Linear(config.d_model, config.ffn_dim, config.init_std, generator) if self.kind == "swiglu" else None
        self.down = Linear(config.ffn_dim, config.d_model, out_std, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_number: int, seed: int = 0):
        super().__init__()
        generator = layer_generator(seed, layer_number)
        # Scaled init of the residual projections (GPT-2 / Megatron): std / sqrt(2 * num_layers).
        out_std = config.init_std / math.sqrt(2.0 * config.num_layers)
        self.attn_norm = Norm(config)
        self.attn = Attention(config, generator, out_std)
        self.mlp_norm = Norm(config)
        self.mlp = MLP(config, generator, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Embedding(nn.Module):
    """Token embedding (padded vocabulary); with tied embeddings also the output projection."""

    def __init__(self, config: GPTConfig, seed: int = 0):
        super().__init__()
        self.weight = nn.Parameter(
            _normal((config.padded_vocab_size, config.d_model), config.init_std, layer_generator(seed, 0))
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


class Head(nn.Module):
    """Final norm, then the output projection (its own matrix unless embeddings are tied)."""

    def __init__(self, config: GPTConfig, seed: int = 0):
        super().__init__()
        self.norm = Norm(config)
        self.proj = None
        if not config.tied_embeddings:
            generator = layer_generator(seed, config.num_layers + 1)
            self.proj = Linear(config.d_model, config.padded_vocab_size, config.init_std, generator)

    def forward(self, hidden: torch.Tensor, embedding: Embedding | None = None) -> torch.Tensor:
        hidden = self.norm(hidden)
        return self.proj(hidden) if self.proj is not None else embedding.logits(hidden)


class GPT(nn.Module):
    """tokens (batch, seq) -> logits (batch, seq, padded_vocab)."""

    def __init__(self, config: GPTConfig, seed: int = 0, activation_checkpointing: bool = False):
        super().__init__()
        config.validate()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.embedding = Embedding(config, seed)
        self.blocks = nn.ModuleList(Block(config, i + 1, seed) for i in range(config.num_layers))
        self.head = Head(config, seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(x, self.embedding)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32: logits (batch, seq, vocab), labels (batch, seq) -> (batch, seq)."""
    vocab = logits.shape[-1]
    losses = F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1), reduction="none")
    return losses.view(labels.shape)
